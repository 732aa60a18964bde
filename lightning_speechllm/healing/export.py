"""``python -m lightning_speechllm export --ckpt PATH --out DIR``: a healed (or trained) checkpoint -> deployable files.

The output directory holds:

- ``decoder/``: the pruned decoder as a stock Hugging Face directory (active layers only, LoRA merged, tokenizer,
  ``pruning.json``), loadable with ``AutoModelForCausalLM.from_pretrained``;
- ``projector.safetensors``: the projector weights (speech models only);
- ``speechllm.json``: ``SpeechLLM.describe()`` plus the resolved encoder directory and the source checkpoint;
- ``plan.json``: the pruning plan (a ``PruningPlan`` file; a plain record when nothing was removed).

``--format voxtral`` writes ``voxtral/`` in place of the first two: the model as a stock
``VoxtralForConditionalGeneration`` directory (:mod:`lightning_speechllm.model.voxtral_layout`), or an error naming
every reason it has no Voxtral form. ``--format llamacpp`` writes ``llamacpp/`` instead: the pruned decoder, the
Whisper encoder + projector in the layout llama.cpp's converter maps to its GLM-ASR audio graph, and ``speech.json``
(:mod:`lightning_speechllm.model.llamacpp_layout`); ``python -m lightning_speechllm gguf`` converts either.

A released model (``model.pretrained``: Qwen2-Audio, ...) is written whole instead, as ``model/``: a stock directory
of its own class (pruned decoder with LoRA merged, audio tower, projector, processor files), which
``Qwen2AudioForConditionalGeneration.from_pretrained`` (etc.) reloads with the framework's logits.

It is written to a temporary sibling directory and renamed into place, so a failed export leaves no partial output.
The module is rebuilt by :func:`lightning_speechllm.checkpoints.load_module` (the loader ``measure`` and
``sweep`` use too).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from safetensors.torch import save_file

from lightning_speechllm.checkpoints import load_module
from lightning_speechllm.io_utils import atomic_directory
from lightning_speechllm.model.checkpoint import CheckpointError
from lightning_speechllm.model.export import save_pruned_decoder
from lightning_speechllm.model.layer_mask import LayerMaskError
from lightning_speechllm.model.llamacpp_layout import SPEECH_FILE, LlamaCppExportError, save_llamacpp
from lightning_speechllm.model.module import SpeechLLMModule
from lightning_speechllm.model.released.export import save_released
from lightning_speechllm.model.voxtral_layout import VoxtralExportError, save_voxtral

__all__ = ["EXPORT_FORMATS", "export_checkpoint", "main", "write_export"]


def _plan_json(module: SpeechLLMModule) -> dict[str, Any]:
    from lightning_speechllm.pruning.plan import plan_explicit

    mask, sublayers = module.speechllm.layer_mask, module.speechllm.sublayer_mask
    removed = list(mask.removed_layers)
    if not removed and not sublayers.dropped_attention and not sublayers.dropped_mlp:
        return {"removed_layers": [], "num_layers": mask.num_layers, "method": "none",
                "model_id": module.model_config.model_id}
    plan = plan_explicit(mask.num_layers, removed, model_id=module.model_config.model_id)
    plan.removed_attention, plan.removed_mlp = list(sublayers.dropped_attention), list(sublayers.dropped_mlp)
    return plan.to_dict()


EXPORT_FORMATS = ("hf", "voxtral", "llamacpp")


def write_export(module: SpeechLLMModule, directory: Path, source: str | None = None,
                 export_format: str = "hf") -> None:
    """Write decoder/, projector.safetensors, speechllm.json and plan.json of `module` into `directory`; for a
    released model (``model.pretrained``), model/ (the whole model in its own class) instead of the first two; with
    `export_format` 'voxtral', voxtral/ (a stock Voxtral directory) instead of them; with 'llamacpp', llamacpp/
    (what llama.cpp's converter reads)."""
    from lightning_speechllm.assets import resolve

    sl = module.speechllm
    config = sl.config
    description = sl.describe()
    if export_format not in EXPORT_FORMATS:
        raise CheckpointError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    if sl.speech_skip.layers:
        raise CheckpointError(f"the model skips the speech positions in layers {list(sl.speech_skip.layers)} "
                              "(model.speech_skip_layers), which stock transformers and llama.cpp cannot do: the "
                              "export would run them; build the module without it to export")
    if export_format == "voxtral":
        save_voxtral(sl, directory / "voxtral")
    elif export_format == "llamacpp":
        save_llamacpp(sl, directory / "llamacpp")
    elif sl.released is not None:  # the whole model in its own class: stock transformers reloads it
        save_released(sl, directory / "model")
    else:
        save_pruned_decoder(sl.llm, directory / "decoder", sl.tokenizer)
        if sl.projector is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in sl.projector.state_dict().items()}
            save_file(state, str(directory / "projector.safetensors"))
    assembled = sl.released is None and config.encoder_path  # a released model's tower is in model/
    description["encoder_dir"] = str(resolve(config.encoder_path)) if assembled else None
    description["projector_config"] = asdict(config.projector)
    description["source_checkpoint"] = source
    (directory / "speechllm.json").write_text(json.dumps(description, indent=2) + "\n")
    (directory / "plan.json").write_text(json.dumps(_plan_json(module), indent=2) + "\n")


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, export_format: str = "hf") -> Path:
    """Export a checkpoint to `out_dir` atomically (temporary sibling directory, then rename); returns `out_dir`."""
    module = load_module(ckpt_path)
    out = Path(out_dir).expanduser().resolve()
    with atomic_directory(out, CheckpointError) as tmp:
        write_export(module, tmp, source=str(Path(ckpt_path).resolve()), export_format=export_format)
    return out


def build_parser() -> ArgumentParser:
    """jsonargparse parser: ``--ckpt``, ``--out``, ``--config`` (YAML) and ``--print_config``."""
    parser = ArgumentParser(prog="lightning_speechllm export", exit_on_error=False,
                            description="Export a SpeechLLM / healing checkpoint (pruned decoder, LoRA merged).")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--ckpt", type=str, required=True,
                        help="Lightning checkpoint (.ckpt) of a SpeechLLMModule or HealingModule")
    parser.add_argument("--out", type=str, required=True, help="output directory (replaced atomically)")
    parser.add_argument("--format", type=str, default="hf", choices=EXPORT_FORMATS,
                        help="hf: decoder/ + projector (model/ in its own class for a released model); voxtral: "
                             "voxtral/, a stock VoxtralForConditionalGeneration directory (Whisper + 4-frame "
                             "bias-free projector + Llama, trained on the whole 30 s window), which llama.cpp's "
                             "converter reads; llamacpp: llamacpp/, a Whisper + stacking-MLP model in the layout "
                             "llama.cpp's converter maps to its GLM-ASR audio graph (then `gguf --source`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 on success, 2 on bad arguments or a bad checkpoint or target."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args.ckpt, args.out, args.format)
    # LayerMaskError: no stock form (e.g. a linear replacement); Voxtral/LlamaCppExportError: no such form
    except (CheckpointError, LayerMaskError, VoxtralExportError, LlamaCppExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} -> {out}")
    if args.format == "llamacpp":
        note = json.loads((out / "llamacpp" / SPEECH_FILE).read_text()).get("note")
        if note:
            print(f"note: {note}")
    return 0
