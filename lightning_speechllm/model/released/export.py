"""A pruned (healed) released SpeechLLM written back in its own transformers class.

The decoder's active layers come from :func:`~lightning_speechllm.model.export.stock_state_dict` (LoRA merged,
renumbered ``0..k-1``, dropped sublayers zeroed, replacements as stock layers), renamed to where the released class
keeps its decoder; the audio tower and projector are the live ones (healing may have trained the projector). The
config is the source's with the cut text config (``num_hidden_layers``, ``layer_types``), so stock transformers
reloads it with a KV cache of the kept layers only. The processor (tokenizer, feature extractor, chat template) and
the generation config are the source's, kept by :class:`~.parts.ReleasedOrigin`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

from lightning_speechllm.io_utils import atomic_directory

from ..export import PRUNING_FILE, pruning_info, stock_state_dict
from ..layer_mask import unwrap_peft
from .families import ReleasedFamily, ReleasedModelError
from .parts import ReleasedOrigin

if TYPE_CHECKING:  # the SpeechLLM imports this package
    from lightning_speechllm.model.speechllm import SpeechLLM

__all__ = ["checked_meta_model", "released_state_dict", "save_released"]


def released_state_dict(family: ReleasedFamily, llm: torch.nn.Module, tower: torch.nn.Module,
                        projector: torch.nn.Module, other: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The stock class's state dict (its in-memory key names) of the pruned decoder view, tower and projector, and
    of `other` weights kept as they were (:attr:`~.parts.ReleasedOrigin.other_weights`)."""
    state: dict[str, torch.Tensor] = dict(other or {})
    for key, value in stock_state_dict(unwrap_peft(llm)).items():
        if key.startswith("model."):
            state[f"{family.decoder}.{key[len('model.'):]}"] = value
        elif key.startswith("lm_head."):
            state[f"{family.lm_head}.{key[len('lm_head.'):]}"] = value
        else:
            raise ReleasedModelError(f"decoder weight {key!r} has no place in {family.class_name}")
    state.update({f"{family.audio_tower}.{k}": v for k, v in tower.state_dict().items()})
    if family.projector:  # None: the tower projects itself
        state.update({f"{family.projector}.{k}": v for k, v in projector.state_dict().items()})
    return {key: value.detach().contiguous() for key, value in state.items()}


def save_released(speechllm: SpeechLLM, out_dir: str | Path) -> Path:
    """Write `speechllm` (a SpeechLLM on a released model's parts) as a stock directory of its class into `out_dir`
    (assembled in a temporary sibling, then renamed into place); returns `out_dir`."""
    origin: ReleasedOrigin | None = speechllm.released
    if origin is None:
        raise ReleasedModelError("this SpeechLLM was not loaded from a released model (model.pretrained)")
    family, out = origin.family, Path(out_dir).expanduser().resolve()
    state = released_state_dict(family, speechllm.llm, speechllm.encoder.tower, speechllm.projector.net,
                                origin.other_weights)
    cut = copy.deepcopy(unwrap_peft(speechllm.llm).config)  # the cut layer count and per-layer lists
    if type(cut) is type(origin.config):  # a class whose top config is its decoder's (Phi-4-multimodal)
        config = cut
    else:
        config = copy.deepcopy(origin.config)
        config.text_config = cut
    stock = checked_meta_model(family.class_name, config, state, ReleasedModelError)
    with atomic_directory(out, ReleasedModelError) as tmp:
        stock.save_pretrained(tmp, state_dict=state)
        origin.processor.save_pretrained(tmp)
        origin.generation_config.save_pretrained(tmp)
        info = {**pruning_info(speechllm.llm), "family": family.model_type, "source": origin.source}
        (tmp / PRUNING_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def checked_meta_model(class_name: str, config, state: dict[str, torch.Tensor],
                       error: type[Exception] = ReleasedModelError) -> torch.nn.Module:
    """The transformers class `class_name` built from `config` on the meta device (its key names and save logic, no
    memory for weights), once `state` is checked to hold exactly its weights (`error` names the misfits)."""
    with torch.device("meta"):
        stock = getattr(transformers, class_name)(config)
    expected = set(stock.state_dict())
    missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or extra:
        raise error(f"the weights do not fit {class_name}: missing {missing[:3]}, unexpected {extra[:3]}")
    return stock
