"""Convert a GGUF causal LM (e.g. SmolLM2's ``*.Q4_1.gguf``) into a plain fp32 Hugging Face safetensors directory.

transformers dequantizes GGUF tensors on load (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf``
package). The loaded model still carries the GGUF quantizer, which ``save_pretrained`` refuses to serialise, so it
is detached first. The tokenizer (incl. its chat template, read from ``tokenizer.chat_template`` in the GGUF
metadata when the tokenizer conversion drops it) and the generation config are saved next to the weights, so the
output directory loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and no ``gguf_file`` argument.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class GGUFConversionError(RuntimeError):
    """Raised when a GGUF file cannot be converted into a usable HF directory."""


def read_gguf_metadata(gguf_path: str | Path, keys: list[str]) -> dict[str, object]:
    """Read string / scalar metadata ``keys`` from a GGUF file (missing keys are omitted)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    found: dict[str, object] = {}
    for key in keys:
        fld = reader.get_field(key)
        if fld is None:
            continue
        found[key] = fld.contents()
    return found


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize ``gguf_path`` and write model, tokenizer and generation config to ``out_dir``; returns ``out_dir``.

    Raises :class:`GGUFConversionError` if the tokenizer ends up without an EOS token or the chat template is lost
    and cannot be restored from the GGUF metadata.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    _ensure_chat_template(tokenizer, gguf_path)
    if tokenizer.eos_token is None:
        raise GGUFConversionError(f"{gguf_path}: tokenizer has no EOS token after GGUF conversion")
    log.info("dequantizing %s to %s (this takes ~30 s for a 135M model on 2 cores)", gguf_path.name, dtype)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=dtype)
    _detach_quantizer(model)
    _sync_generation_config(model, tokenizer)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions  # GGUF tokenizers come back with an "infinite" limit
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info("converted %s (%s, %d layers) -> %s", gguf_path.name, type(model).__name__,
             model.config.num_hidden_layers, out_dir)
    return out_dir


def _detach_quantizer(model: torch.nn.Module) -> None:
    """Make a dequantized GGUF model serialisable as a plain (unquantized) checkpoint."""
    model.hf_quantizer = None  # ``is_quantized`` and the save-time checks derive from this attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _ensure_chat_template(tokenizer, gguf_path: Path) -> None:
    if getattr(tokenizer, "chat_template", None):
        return
    meta = read_gguf_metadata(gguf_path, ["tokenizer.chat_template"])
    template = meta.get("tokenizer.chat_template")
    if template:
        log.info("restoring chat template from GGUF metadata of %s", gguf_path.name)
        tokenizer.chat_template = str(template)
    else:
        log.warning("%s has no chat template; apply_chat_template will not work", gguf_path.name)


def _sync_generation_config(model, tokenizer) -> None:
    """Point the generation config's EOS / PAD / BOS at the tokenizer's special tokens (e.g. ``<|im_end|>``)."""
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.eos_token_id = gen.eos_token_id
    model.config.bos_token_id = gen.bos_token_id
    model.config.pad_token_id = gen.pad_token_id
