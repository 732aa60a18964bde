"""Convert a CTranslate2 Whisper model (``model.bin``) into a Hugging Face ``WhisperForConditionalGeneration``.

CTranslate2 binary layout (little endian), as written by ``ctranslate2.specs.ModelSpec.save``:

* ``uint32`` format version, spec name (``uint16`` length + UTF-8 bytes, NUL-terminated), ``uint32`` revision;
* ``uint32`` variable count, then per variable: name (string as above), ``uint8`` rank, ``rank`` x ``uint32``
  dims, ``uint8`` dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), ``uint32`` byte count, raw bytes;
* for version >= 3 an alias table: ``uint32`` count, then (alias, target) string pairs.

:func:`read_ct2_model` parses that file into named tensors; :func:`ct2_to_hf_state_dict` maps the names onto HF
Whisper (splitting the fused q,k,v and cross-attention k,v projections; HF's ``k_proj`` has no bias, CT2 stores a
zero one); :func:`build_whisper_config` infers a :class:`~transformers.WhisperConfig` from the tensor shapes plus
the CT2 ``config.json``; :func:`convert_ct2_whisper` writes a complete HF model directory (weights, generation
config, feature extractor and, when the CT2 directory ships ``tokenizer.json``, the tokenizer).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch

if TYPE_CHECKING:
    from transformers import GenerationConfig, WhisperConfig

log = logging.getLogger(__name__)

CT2_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
"""CTranslate2 dtype code -> torch dtype."""


class CT2FormatError(ValueError):
    """Raised when a ``model.bin`` cannot be parsed or does not describe a supported Whisper model."""


@dataclass
class CT2Model:
    """The parsed content of a CTranslate2 ``model.bin``."""

    version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        """Return variable ``name``, following the alias table; raises ``KeyError`` naming the missing variable."""
        target = self.aliases.get(name, name)
        if target not in self.variables:
            raise KeyError(f"CT2 model ({self.spec}) has no variable {name!r}")
        return self.variables[target]


# --------------------------------------------------------------------------------------------- binary reader
def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CT2FormatError(f"truncated model.bin at byte {f.tell()}: wanted {n} bytes for {what}, got {len(data)}")
    return data


def _read_uint(f: BinaryIO, fmt: str, what: str) -> int:
    return struct.unpack("<" + fmt, _read_exact(f, struct.calcsize(fmt), what))[0]


def _read_string(f: BinaryIO, what: str) -> str:
    length = _read_uint(f, "H", f"length of {what}")
    return _read_exact(f, length, what).rstrip(b"\0").decode("utf-8")


def read_ct2_model(path: str | Path | list[str | Path]) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` into tensors.

    ``path`` may also be a list of files whose concatenation is the ``model.bin`` (a model split into parts).
    Raises :class:`CT2FormatError` naming the file, byte offset and variable on malformed input.
    """
    paths = [Path(p) for p in (path if isinstance(path, list) else [path])]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"CT2 model file not found: {p}")
    data = b"".join(p.read_bytes() for p in paths)
    import io

    f = io.BytesIO(data)
    source = "+".join(str(p) for p in paths)
    try:
        return _parse(f)
    except CT2FormatError as err:
        raise CT2FormatError(f"{source}: {err}") from None


def _parse(f: BinaryIO) -> CT2Model:
    version = _read_uint(f, "I", "version")
    if not 1 <= version <= 10:
        raise CT2FormatError(f"unsupported format version {version} (not a CTranslate2 model.bin?)")
    spec = _read_string(f, "spec name") if version >= 2 else ""
    revision = _read_uint(f, "I", "spec revision") if version >= 2 else 1
    count = _read_uint(f, "I", "variable count")
    variables: dict[str, torch.Tensor] = {}
    for index in range(count):
        name = _read_string(f, f"name of variable #{index}")
        rank = _read_uint(f, "B", f"rank of {name!r}")
        dims = [_read_uint(f, "I", f"dim {d} of {name!r}") for d in range(rank)]
        code = _read_uint(f, "B", f"dtype of {name!r}")
        if code not in CT2_DTYPES:
            raise CT2FormatError(f"variable {name!r} (#{index}) has unknown dtype code {code}")
        nbytes = _read_uint(f, "I", f"byte count of {name!r}")
        dtype = CT2_DTYPES[code]
        numel = 1
        for d in dims:
            numel *= d
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes != expected:
            raise CT2FormatError(
                f"variable {name!r} (#{index}): byte count {nbytes} != {expected} for shape {dims} {dtype}"
            )
        raw = bytearray(_read_exact(f, nbytes, f"data of {name!r}"))
        tensor = torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(dims)
    aliases: dict[str, str] = {}
    if version >= 3:
        n_alias = _read_uint(f, "I", "alias count")
        for index in range(n_alias):
            alias = _read_string(f, f"alias #{index}")
            aliases[alias] = _read_string(f, f"target of alias {alias!r}")
    return CT2Model(version=version, spec=spec, revision=revision, variables=variables, aliases=aliases)


def write_ct2_model(
    path: str | Path,
    variables: dict[str, torch.Tensor],
    spec: str = "WhisperSpec",
    revision: int = 3,
    version: int = 6,
    aliases: dict[str, str] | None = None,
) -> None:
    """Write tensors in the CTranslate2 ``model.bin`` layout (the inverse of :func:`read_ct2_model`)."""
    codes = {v: k for k, v in CT2_DTYPES.items()}

    def string(s: str) -> bytes:
        b = s.encode("utf-8") + b"\0"
        return struct.pack("<H", len(b)) + b

    out = [struct.pack("<I", version), string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, tensor in variables.items():
        if tensor.dtype not in codes:
            raise CT2FormatError(f"variable {name!r}: dtype {tensor.dtype} has no CT2 code")
        t = tensor.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out += [string(name), struct.pack("<B", t.dim())]
        out += [struct.pack("<I", d) for d in t.shape]
        out += [struct.pack("<B", codes[t.dtype]), struct.pack("<I", len(raw)), raw]
    if version >= 3:
        aliases = aliases or {}
        out.append(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            out += [string(alias), string(target)]
    Path(path).write_bytes(b"".join(out))


# --------------------------------------------------------------------------------------------- name mapping
_LN = {"gamma": "weight", "beta": "bias"}
_LINEAR = {"weight": "weight", "bias": "bias"}


def _copy(sd: dict[str, torch.Tensor], hf: str, t: torch.Tensor) -> None:
    sd[hf] = t.to(torch.float32).clone()


def _map_layer_norm(model: CT2Model, ct2: str, hf: str, sd: dict[str, torch.Tensor]) -> None:
    for src, dst in _LN.items():
        _copy(sd, f"{hf}.{dst}", model.get(f"{ct2}/{src}"))


def _map_linear(model: CT2Model, ct2: str, hf: str, sd: dict[str, torch.Tensor]) -> None:
    _copy(sd, f"{hf}.weight", model.get(f"{ct2}/weight"))
    if f"{ct2}/bias" in model.variables or f"{ct2}/bias" in model.aliases:
        _copy(sd, f"{hf}.bias", model.get(f"{ct2}/bias"))


def _split_linear(model: CT2Model, ct2: str, hf_names: list[str], sd: dict[str, torch.Tensor]) -> None:
    """Split a fused projection stacked on dim 0 into ``hf_names``; a name ending in ``k_proj`` gets no bias."""
    weight = model.get(f"{ct2}/weight")
    bias = model.get(f"{ct2}/bias")
    parts = len(hf_names)
    if weight.shape[0] % parts:
        raise CT2FormatError(f"{ct2}/weight rows {weight.shape[0]} not divisible into {parts} projections")
    for name, w, b in zip(hf_names, weight.chunk(parts, 0), bias.chunk(parts, 0)):
        _copy(sd, f"{name}.weight", w)
        if name.endswith("k_proj"):
            if b.abs().max().item() > 1e-6:
                log.warning("%s: dropping non-zero k bias (max |b| = %.3g); HF k_proj has no bias", ct2, b.abs().max())
            continue
        _copy(sd, f"{name}.bias", b)


def _layer_count(model: CT2Model, side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    ids = {int(m.group(1)) for name in model.variables if (m := pattern.match(name))}
    if not ids:
        raise CT2FormatError(f"CT2 model has no {side}/layer_* variables (not a Whisper spec? spec={model.spec!r})")
    if ids != set(range(len(ids))):
        raise CT2FormatError(f"{side} layer indices are not contiguous: {sorted(ids)}")
    return len(ids)


def ct2_to_hf_state_dict(model: CT2Model) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables onto a HF ``WhisperForConditionalGeneration`` state dict (fp32)."""
    sd: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        _map_linear(model, f"encoder/{conv}", f"{enc}.{conv}", sd)
    _copy(sd, f"{enc}.embed_positions.weight", model.get("encoder/position_encodings/encodings"))
    _map_layer_norm(model, "encoder/layer_norm", f"{enc}.layer_norm", sd)
    for i in range(_layer_count(model, "encoder")):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        _map_self_attention(model, src, dst, sd)
        _map_ffn(model, src, dst, sd)
    _copy(sd, f"{dec}.embed_tokens.weight", model.get("decoder/embeddings/weight"))
    _copy(sd, f"{dec}.embed_positions.weight", model.get("decoder/position_encodings/encodings"))
    _map_layer_norm(model, "decoder/layer_norm", f"{dec}.layer_norm", sd)
    for i in range(_layer_count(model, "decoder")):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        _map_self_attention(model, src, dst, sd)
        _map_layer_norm(model, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", sd)
        _map_linear(model, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", sd)
        _split_linear(
            model, f"{src}/attention/linear_1", [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"], sd
        )
        _map_linear(model, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", sd)
        _map_ffn(model, src, dst, sd)
    return sd


def _map_self_attention(model: CT2Model, src: str, dst: str, sd: dict[str, torch.Tensor]) -> None:
    _map_layer_norm(model, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", sd)
    names = [f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    _split_linear(model, f"{src}/self_attention/linear_0", names, sd)
    _map_linear(model, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", sd)


def _map_ffn(model: CT2Model, src: str, dst: str, sd: dict[str, torch.Tensor]) -> None:
    _map_layer_norm(model, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", sd)
    _map_linear(model, f"{src}/ffn/linear_0", f"{dst}.fc1", sd)
    _map_linear(model, f"{src}/ffn/linear_1", f"{dst}.fc2", sd)


# --------------------------------------------------------------------------------------------- config
def _scalar(model: CT2Model, name: str) -> int | None:
    try:
        return int(model.get(name).reshape(-1)[0].item())
    except KeyError:
        return None


def build_whisper_config(
    model: CT2Model, ct2_config: dict | None = None, special: dict[str, int] | None = None
) -> WhisperConfig:
    """Infer a :class:`transformers.WhisperConfig` from tensor shapes, the CT2 ``config.json`` and the special
    token ids (see :func:`special_token_ids`; OpenAI's ids are assumed when absent)."""
    from transformers import WhisperConfig

    ct2_config = ct2_config or {}
    vocab, d_model = model.get("decoder/embeddings/weight").shape
    conv1 = model.get("encoder/conv1/weight")
    ffn = model.get("encoder/layer_0/ffn/linear_0/weight").shape[0]
    enc_heads = _scalar(model, "encoder/num_heads")
    dec_heads = _scalar(model, "decoder/num_heads") or enc_heads
    if enc_heads is None:
        enc_heads = dec_heads = max(1, d_model // 64)  # every released Whisper uses 64-dim heads
        log.warning("CT2 model has no num_heads scalar; assuming %d heads (64-dim)", enc_heads)
    multilingual = vocab >= 51865
    special = special or {}
    eot = special.get("<|endoftext|>", 50257 if multilingual else 50256)
    sot = special.get("<|startoftranscript|>", eot + 1)
    no_ts = special.get("<|notimestamps|>", 50363 if multilingual else 50362)
    for token, index in (("<|endoftext|>", eot), ("<|startoftranscript|>", sot), ("<|notimestamps|>", no_ts)):
        if not 0 <= index < vocab:
            raise CT2FormatError(f"{token} id {index} outside the vocabulary (size {vocab}); ship a vocabulary file")
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=conv1.shape[1],
        d_model=d_model,
        encoder_layers=_layer_count(model, "encoder"),
        decoder_layers=_layer_count(model, "decoder"),
        encoder_attention_heads=enc_heads,
        decoder_attention_heads=dec_heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=model.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=model.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=model.get("decoder/position_encodings/encodings").shape[0],
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        # generation-only settings live in generation_config.json (transformers 5 warns if both carry them)
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
    )
    config.alignment_heads = [list(h) for h in ct2_config.get("alignment_heads", [])]
    config.no_timestamps_token_id = no_ts
    config.lang_ids = list(ct2_config.get("lang_ids", []))
    return config


def special_token_ids(ct2_dir: str | Path) -> dict[str, int]:
    """``<|...|>`` token -> id, from ``tokenizer.json`` (added tokens) or else CT2's ``vocabulary.json|txt``."""
    ct2_dir = Path(ct2_dir)
    tok_json = _read_json(ct2_dir / "tokenizer.json")
    if tok_json is not None:
        return {t["content"]: int(t["id"]) for t in tok_json.get("added_tokens", [])}
    vocab = _read_json(ct2_dir / "vocabulary.json")
    if vocab is None and (ct2_dir / "vocabulary.txt").is_file():
        vocab = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    if vocab is None:
        return {}
    if not isinstance(vocab, list):
        raise CT2FormatError(f"{ct2_dir}/vocabulary.json: expected a JSON list of tokens, got {type(vocab).__name__}")
    return {tok: i for i, tok in enumerate(vocab) if _is_special(tok)}


def _is_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>") and not token[2:3].isdigit()  # not a timestamp


def build_generation_config(
    config: WhisperConfig, ct2_config: dict | None = None, special: dict[str, int] | None = None
) -> GenerationConfig:
    """A :class:`transformers.GenerationConfig` for Whisper's ``generate`` (suppressed ids from the CT2 config,
    task/language ids from the tokenizer)."""
    from transformers import GenerationConfig

    ct2_config = ct2_config or {}
    special = special or {}
    multilingual = config.vocab_size >= 51865
    gen = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, config.eos_token_id])),
        no_timestamps_token_id=config.no_timestamps_token_id,
        max_length=config.max_target_positions,
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    gen.alignment_heads = config.alignment_heads
    gen.max_initial_timestamp_index = 50
    gen.prev_sot_token_id = special.get("<|startofprev|>")
    if multilingual and special:
        gen.lang_to_id = {t: i for t, i in special.items() if i in set(config.lang_ids)}
        gen.task_to_id = {k: special[f"<|{k}|>"] for k in ("transcribe", "translate") if f"<|{k}|>" in special}
    return gen


# --------------------------------------------------------------------------------------------- end to end
def convert_ct2_whisper(
    ct2_dir: str | Path, out_dir: str | Path, model_files: list[str | Path] | None = None
) -> Path:
    """Convert a CTranslate2 Whisper directory into a HF ``WhisperForConditionalGeneration`` directory.

    ``model_files`` overrides ``ct2_dir/model.bin`` (e.g. the parts of a split model, concatenated in order).
    Writes ``model.safetensors``, ``config.json``, ``generation_config.json``, ``preprocessor_config.json`` and,
    if ``ct2_dir/tokenizer.json`` exists, the tokenizer files. Returns ``out_dir``.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    files = model_files or [ct2_dir / "model.bin"]
    ct2 = read_ct2_model(list(files))
    if ct2.spec and "whisper" not in ct2.spec.lower():
        raise CT2FormatError(f"{files[0]}: spec {ct2.spec!r} is not a Whisper model")
    ct2_config = _read_json(ct2_dir / "config.json")
    special = special_token_ids(ct2_dir)
    config = build_whisper_config(ct2, ct2_config, special)
    state = ct2_to_hf_state_dict(ct2)
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = build_generation_config(config, ct2_config, special)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    if (ct2_dir / "tokenizer.json").is_file():
        _save_tokenizer(ct2_dir / "tokenizer.json", out_dir, config)
    log.info("converted %s (%s, %d variables) -> %s", files[0], ct2.spec, len(ct2.variables), out_dir)
    return out_dir


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CT2FormatError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None


def _save_tokenizer(tokenizer_file: Path, out_dir: Path, config: WhisperConfig) -> None:
    from transformers import WhisperTokenizer

    multilingual = config.vocab_size >= 51865
    tok = WhisperTokenizer(
        tokenizer_file=str(tokenizer_file),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        language="english" if multilingual else None,
        task="transcribe" if multilingual else None,
        predict_timestamps=False,
        model_max_length=config.max_target_positions,
    )
    tok.save_pretrained(out_dir)
