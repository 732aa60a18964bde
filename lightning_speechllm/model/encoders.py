"""Speech encoders read from local Hugging Face directories, behind one interface.

Every encoder takes raw 16 kHz waveforms plus their lengths and returns frame features plus frame lengths; features
(Whisper log-mel, waveform normalisation) are computed here so they run on the training device. Adding an encoder
family is one entry in `ENCODER_REGISTRY`.
"""
from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchaudio
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lightning_speechllm.data.batch import SAMPLE_RATE


class EncoderError(ValueError):
    """An encoder directory or config that cannot be used."""


class SpeechEncoder(nn.Module):
    """Interface: waveforms [B, S] at 16 kHz + lengths [B] -> features [B, T, D] + frame lengths [B]."""

    output_dim: int

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class WhisperLogMel(nn.Module):
    """Whisper's log-mel front end (n_fft 400, hop 160, Slaney mel, log10, 8 dB floor, (x + 4) / 4) in torchaudio."""

    def __init__(self, n_mels: int = 80) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=n_mels, power=2.0,
            norm="slaney", mel_scale="slaney", center=True, pad_mode="reflect",
        )

    def _apply(self, fn, recurse: bool = True):
        """Move with the module, but keep the window and filterbank in float32: the features are computed in float32
        whatever the module's dtype (`bf16-true` casts every buffer)."""
        float32 = {name: buffer for name, buffer in self.mel.named_buffers() if buffer.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, moved in list(self.mel.named_buffers()):
            if name in float32 and moved.dtype != torch.float32:
                owner, _, leaf = name.rpartition(".")
                self.mel.get_submodule(owner)._buffers[leaf] = float32[name].to(moved.device)
        return self

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, S] waveforms (already padded to the window) -> [B, n_mels, S // 160] log-mel features."""
        with torch.autocast(device_type=audio.device.type, enabled=False):
            spec = self.mel(audio.float())[..., :-1]
            log_spec = torch.clamp(spec, min=1e-10).log10()
            peak = log_spec.amax(dim=(1, 2), keepdim=True)
            log_spec = torch.maximum(log_spec, peak - 8.0)
            return (log_spec + 4.0) / 4.0


class WhisperSpeechEncoder(SpeechEncoder):
    """Whisper encoder only: pads every utterance to the 30 s window and keeps the frames that cover real audio."""

    def __init__(self, config: WhisperConfig, encoder: WhisperEncoder | None = None) -> None:
        """`encoder`: an already built (loaded) HF encoder; None builds a randomly initialised one."""
        super().__init__()
        self.config = config
        self.features = WhisperLogMel(config.num_mel_bins)
        self.encoder = encoder if encoder is not None else WhisperEncoder(config)
        self.output_dim = config.d_model
        # 2 mel frames per encoder frame (conv2 stride 2), 160 samples per mel frame.
        self.full_window_samples = config.max_source_positions * 2 * 160
        self.window_samples = self.full_window_samples
        self.window_step_samples: int | None = None
        self.whole_window = False
        """Every frame of the window is a speech position (Voxtral's and llama.cpp's way), not only the utterance's."""

    def set_window(self, seconds: float | None) -> None:
        """Pin the window to `seconds` instead of Whisper's 30 s (None restores 30 s). Much faster on short utterances,
        but the encoder then sees a shorter context than in pre-training, so train and evaluate with the same window."""
        self.window_step_samples = None
        self.window_samples = self._window_samples(seconds, "window_seconds") if seconds else self.full_window_samples

    def set_window_step(self, seconds: float) -> None:
        """Choose the window per utterance: the smallest multiple of `seconds` that holds it, up to 30 s. Utterances
        up to one step long are encoded exactly as with a window pinned to `seconds`; longer ones still fit."""
        self.window_samples = self.full_window_samples
        self.window_step_samples = self._window_samples(seconds, "window_step_seconds")

    def _window_samples(self, seconds: float, name: str) -> int:
        samples = int(math.ceil(seconds * SAMPLE_RATE / 320)) * 320  # whole encoder frames
        if not 0 < samples <= self.full_window_samples:
            raise EncoderError(f"{name} must be in (0, {self.full_window_samples / SAMPLE_RATE:.0f}], got {seconds}")
        return samples

    def windows(self, audio_lens: torch.Tensor) -> torch.Tensor:
        """The window (in samples) each utterance is padded to."""
        if self.window_step_samples is None:
            return torch.full_like(audio_lens, self.window_samples)
        step = self.window_step_samples
        steps = torch.div(audio_lens.clamp(min=1) + step - 1, step, rounding_mode="floor")
        return (steps * step).clamp(max=self.full_window_samples)

    @classmethod
    def from_pretrained(cls, path: Path, config: WhisperConfig,
                        dtype: torch.dtype = torch.float32) -> "WhisperSpeechEncoder":
        """The encoder of a Whisper checkpoint (the decoder's tensors are never read), weights in `dtype`. The
        module is built on the meta device and takes the checkpoint's tensors as its parameters: no random
        initialisation, and the weights are in memory once."""
        state = _load_state_dict_with_prefix(path, ("model.encoder.", "encoder."), dtype)
        with torch.device("meta"):
            encoder = WhisperEncoder(config)
        missing = sorted(set(encoder.state_dict()) - set(state))
        if missing:
            raise EncoderError(f"{path}: Whisper encoder weights missing from the checkpoint: {missing[:5]}...")
        encoder.load_state_dict(state, strict=False, assign=True)  # extra tensors are ignored, as before
        left = [name for name, t in (*encoder.named_parameters(), *encoder.named_buffers()) if t.is_meta]
        if left:
            raise EncoderError(f"{path}: Whisper encoder tensors not in the checkpoint: {left[:5]}")
        return cls(config, encoder=encoder)

    def _encode_short_window(self, mel: torch.Tensor) -> torch.Tensor:
        """HF's WhisperEncoder.forward with the positional table cut to the window (HF insists on 3000 frames)."""
        encoder = self.encoder
        hidden = nn.functional.gelu(encoder.conv2(nn.functional.gelu(encoder.conv1(mel)))).permute(0, 2, 1)
        hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
        for layer in encoder.layers:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return encoder.layer_norm(hidden)

    @staticmethod
    def frame_lengths(audio_lens: torch.Tensor) -> torch.Tensor:
        """Encoder frames that cover each utterance (2 mel frames each, 160 samples per mel frame)."""
        mel_frames = torch.div(audio_lens + 159, 160, rounding_mode="floor")
        return torch.div(mel_frames + 1, 2, rounding_mode="floor").clamp(min=1)

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        longest = int(audio_lens.max()) if len(audio_lens) else 0
        limit = self.window_samples if self.window_step_samples is None else self.full_window_samples
        if longest > limit:
            raise EncoderError(
                f"audio of {longest / SAMPLE_RATE:.2f} s exceeds Whisper's {limit / SAMPLE_RATE:.1f} s window; filter "
                "long utterances in the data layer (max_audio_seconds)"
            )
        lens = self.frame_lengths(audio_lens)
        if self.whole_window:
            lens = torch.full_like(lens, self.window_samples // 320)
        windows = self.windows(audio_lens)
        groups = sorted(set(windows.tolist()))
        if len(groups) == 1:  # one window for the whole batch (always so for a pinned window): no gather/scatter
            return self._encode_window(audio[:, : groups[0]], groups[0], int(lens.max())), lens
        hidden = None
        for window in groups:
            rows = (windows == window).nonzero().flatten()
            group = self._encode_window(audio[rows, : min(window, audio.shape[1])], window, int(lens[rows].max()))
            if hidden is None:
                hidden = group.new_zeros(len(audio), int(lens.max()), group.shape[-1])
            hidden[rows, : group.shape[1]] = group
        return hidden, lens

    def _encode_window(self, audio: torch.Tensor, window: int, frames: int) -> torch.Tensor:
        """Encode waveforms padded to `window` samples; the first `frames` encoder frames. The log-mel features are
        computed in float32 whatever the module's dtype."""
        padded = nn.functional.pad(audio.float(), (0, window - audio.shape[1]))
        mel = self.features(padded).to(self.encoder.conv1.weight.dtype)
        if window == self.full_window_samples:
            hidden = self.encoder(input_features=mel).last_hidden_state
        else:
            hidden = self._encode_short_window(mel)
        return hidden[:, :frames]


class WaveformSpeechEncoder(SpeechEncoder):
    """WavLM / HuBERT / wav2vec2: raw waveform in, per-utterance zero-mean unit-variance normalised when asked."""

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.output_dim = model.config.hidden_size
        # Models with group-norm feature extractors were trained without attention masks (HF's own rule).
        self.use_attention_mask = getattr(model.config, "feat_extract_norm", "layer") == "layer"

    @classmethod
    def from_pretrained(cls, path: Path, config: PretrainedConfig,
                        dtype: torch.dtype = torch.float32) -> "WaveformSpeechEncoder":
        # transformers 5 loads on the meta device from the memory-mapped checkpoint (no random init, one copy).
        model = AutoModel.from_pretrained(path, config=config, dtype=dtype)
        return cls(model, normalize=_reads_do_normalize(path))

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "WaveformSpeechEncoder":
        return cls(AutoModel.from_config(config))

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < audio_lens[:, None]
        # The normalisation runs in float32 whatever the weights' (or a `*-true` precision's batch) dtype: the
        # variance of a long waveform in bf16 is visibly off. Only its result is cast to the model's dtype.
        audio = audio.float()
        if self.normalize:
            with torch.autocast(device_type=audio.device.type, enabled=False):
                audio = zero_mean_unit_var(audio, valid)
        kwargs = {"attention_mask": valid.long()} if self.use_attention_mask else {}
        hidden = self.model(input_values=audio.to(self._dtype()), **kwargs).last_hidden_state
        lens = self.model._get_feat_extract_output_lengths(audio_lens).clamp(max=hidden.shape[1])
        return hidden, lens

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def zero_mean_unit_var(audio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (audio * valid).sum(dim=1, keepdim=True) / count
    var = (((audio - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
    return (audio - mean) / torch.sqrt(var + 1e-7) * valid


def _reads_do_normalize(path: Path) -> bool:
    preprocessor = Path(path) / "preprocessor_config.json"
    if preprocessor.is_file():
        return bool(json.loads(preprocessor.read_text()).get("do_normalize", True))
    return True


def _load_state_dict_with_prefix(path: Path, prefixes: tuple[str, ...],
                                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the first prefix found in the directory's (possibly sharded) safetensors, with the prefix cut, in
    `dtype` (None: as stored). Only those tensors are read: the file headers list the keys, and `safe_open` reads
    one tensor at a time from the memory-mapped file (a full Whisper checkpoint's decoder is never loaded)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise EncoderError(f"{path}: no *.safetensors weights found")
    keys = {file: _safetensors_keys(file) for file in files}
    for prefix in prefixes:
        wanted = {file: [k for k in file_keys if k.startswith(prefix)] for file, file_keys in keys.items()}
        if any(wanted.values()):
            return {key[len(prefix):]: tensor for key, tensor in _read_tensors(wanted, dtype)}
    raise EncoderError(f"{path}: no tensors start with any of {prefixes}")


def _safetensors_keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def _read_tensors(wanted: dict[Path, list[str]], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for the chosen keys of each file. A tensor already in `dtype` stays a view of the memory-mapped
    file (no copy: the weights are in memory once). One that is cast is copied; the file is then re-opened every
    `_REMAP_BYTES` of cast tensors, so that the pages already converted are unmapped instead of adding up."""
    for file, file_keys in wanted.items():
        pending = deque(file_keys)
        while pending:
            with safe_open(str(file), framework="pt") as handle:
                cast_bytes = 0
                while pending and cast_bytes < _REMAP_BYTES:
                    key = pending.popleft()
                    tensor = handle.get_tensor(key)
                    if dtype is not None and tensor.dtype != dtype:
                        cast_bytes += tensor.nbytes
                        tensor = tensor.to(dtype)
                    yield key, tensor


_REMAP_BYTES = 256 * 2**20


EncoderLoader = Callable[[Path, PretrainedConfig, torch.dtype], SpeechEncoder]
EncoderBuilder = Callable[[PretrainedConfig], SpeechEncoder]

ENCODER_REGISTRY: dict[str, tuple[EncoderLoader, EncoderBuilder]] = {
    "whisper": (WhisperSpeechEncoder.from_pretrained, WhisperSpeechEncoder),
    "wavlm": (WaveformSpeechEncoder.from_pretrained, WaveformSpeechEncoder.from_config),
    "hubert": (WaveformSpeechEncoder.from_pretrained, WaveformSpeechEncoder.from_config),
    "wav2vec2": (WaveformSpeechEncoder.from_pretrained, WaveformSpeechEncoder.from_config),
}
"""model_type -> (load from a local directory with weights in a dtype, build randomly initialised from a config)."""


def _registry_entry(model_type: str) -> tuple[EncoderLoader, EncoderBuilder]:
    if model_type not in ENCODER_REGISTRY:
        raise EncoderError(
            f"unsupported speech encoder model_type {model_type!r}; supported: {sorted(ENCODER_REGISTRY)}"
        )
    return ENCODER_REGISTRY[model_type]


def load_speech_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> SpeechEncoder:
    """Load the encoder of a local HF directory (a full Whisper checkpoint is fine: only its encoder is read), its
    weights in `dtype` (the features are computed in float32 whatever it is)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise EncoderError(f"{path}: not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    loader, _ = _registry_entry(config.model_type)
    return loader(path, config, dtype)


def build_speech_encoder(config: PretrainedConfig) -> SpeechEncoder:
    """A randomly initialised encoder from a config (tests, ablations)."""
    _, builder = _registry_entry(config.model_type)
    return builder(config)
