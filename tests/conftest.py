"""Test-wide settings: one torch thread (tiny models on a shared 2-core machine run far faster that way)."""
import torch

torch.set_num_threads(1)
