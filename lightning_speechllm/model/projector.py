"""Projector from encoder frames to LLM embeddings: downsample by k, then a one-hidden-layer GELU MLP (SLAM-style)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ProjectorConfig:
    """How encoder frames become LLM input embeddings."""

    kind: str = "mlp"
    """'mlp': stack k consecutive frames then Linear-GELU-Linear (the paper); 'conv1d': strided Conv1d-GELU-Linear."""
    downsample: int = 5
    """Frames merged into one LLM position (k)."""
    hidden_dim: int = 2048
    """Width of the hidden layer."""
    bias: bool = True
    """Biases on the projector's linears (and conv). Voxtral's projector has none: ``export --format voxtral``
    needs False, with `kind` mlp, `downsample` 4 and `hidden_dim` the LLM's width."""
    time_masks: int = 0
    """Training only: SpecAugment-style masks over time on the encoder frames (torchaudio's TimeMasking, drawn per
    utterance), so the projector cannot lean on any one stretch of frames. 0 = off (the paper)."""
    time_mask_frames: int = 10
    """Longest time mask, in encoder frames (Whisper: 20 ms each)."""
    feature_masks: int = 0
    """Training only: masks over the encoder's feature dimension (torchaudio's FrequencyMasking, per utterance), so
    the projector cannot lean on a few channels (a voice's timbre lives in some). 0 = off."""
    feature_mask_width: int = 40
    """Widest feature mask, in encoder channels."""


class Projector(nn.Module):
    """[B, T, D_enc] + lengths -> [B, ceil(T / k), D_llm] + lengths."""

    def __init__(self, input_dim: int, output_dim: int, config: ProjectorConfig | None = None) -> None:
        super().__init__()
        self.config = config or ProjectorConfig()
        k, hidden = self.config.downsample, self.config.hidden_dim
        if k < 1:
            raise ValueError(f"projector downsample must be >= 1, got {k}")
        if self.config.kind == "mlp":
            self.down = None
            bias = self.config.bias
            self.net = nn.Sequential(nn.Linear(input_dim * k, hidden, bias=bias), nn.GELU(),
                                     nn.Linear(hidden, output_dim, bias=bias))
        elif self.config.kind == "conv1d":
            self.down = nn.Conv1d(input_dim, hidden, kernel_size=k, stride=k, bias=self.config.bias)
            self.net = nn.Sequential(nn.GELU(), nn.Linear(hidden, output_dim, bias=self.config.bias))
        else:
            raise ValueError(f"unknown projector kind {self.config.kind!r}; expected 'mlp' or 'conv1d'")
        for name in ("time_masks", "time_mask_frames", "feature_masks", "feature_mask_width"):
            if getattr(self.config, name) < 0:
                raise ValueError(f"projector {name} must be >= 0, got {getattr(self.config, name)}")
        self.masks = self._frame_masks()

    def _frame_masks(self) -> nn.Sequential | None:
        import torchaudio

        c = self.config
        masks = [torchaudio.transforms.TimeMasking(c.time_mask_frames, iid_masks=True)
                 for _ in range(c.time_masks if c.time_mask_frames else 0)]
        masks += [torchaudio.transforms.FrequencyMasking(c.feature_mask_width, iid_masks=True)
                  for _ in range(c.feature_masks if c.feature_mask_width else 0)]
        return nn.Sequential(*masks) if masks else None

    def output_lengths(self, lens: torch.Tensor) -> torch.Tensor:
        k = self.config.downsample
        return torch.div(lens + k - 1, k, rounding_mode="floor")

    def forward(self, frames: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.config.downsample
        batch, time, dim = frames.shape
        # Frames past an utterance's end (encoder output over padding) must not leak into its last stacked group.
        valid = torch.arange(time, device=frames.device)[None, :] < lens[:, None]
        frames = (frames * valid[..., None]).to(self._dtype())
        if self.training and self.masks is not None:  # [B, D, T]: torchaudio's (freq, time) layout
            frames = self.masks(frames.transpose(1, 2)).transpose(1, 2)
        frames = nn.functional.pad(frames, (0, 0, 0, (-time) % k))
        if self.down is None:
            stacked = frames.reshape(batch, -1, dim * k)
        else:
            stacked = self.down(frames.transpose(1, 2)).transpose(1, 2)
        # A copy, not the linear's view: FSDP2 hooks its backward on the output and warns about in-place ops on views.
        return self.net(stacked).clone(), self.output_lengths(lens)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
