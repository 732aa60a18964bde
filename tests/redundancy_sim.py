"""Simulated redundancy maps for calibration tests: random pre-norm-like residual streams measured with the project's
own :class:`~lightning_speechllm.redundancy.metrics.AngularDistanceMetric`.

A stream of ``L`` layers is ``x^{l+1} = x^l + s_l · ε_l`` with ``ε_l ~ N(0, I_D)`` per utterance. The layer strengths
``s_l = exp(growth · l / L) · exp(spread · z_l)``, ``z_l ~ N(0, 1)``, give every layer its own random strength while
the norm grows with depth, as in pre-norm LLMs. Two maps are *related* when they share the strengths (new utterances,
new noise) and *unrelated* when their strengths are drawn independently: unrelated maps still share the generic shape
(d grows with n, layer 0 stands out, the depth trend), which is what a calibrated null must not count as agreement.
"""
from __future__ import annotations

import numpy as np
import torch

from lightning_speechllm.redundancy.metrics import AngularDistanceMetric

LAYERS = 16


def layer_strengths(rng: np.random.Generator, layers: int = LAYERS, growth: float = 1.5,
                    spread: float = 0.5) -> np.ndarray:
    """``[L]`` per-layer strengths: a shared growth with depth times a layer's own log-normal factor."""
    depth = np.arange(layers) / layers
    return np.exp(growth * depth + spread * rng.standard_normal(layers))


def per_sample_maps(strengths: np.ndarray, rng: np.random.Generator, num_samples: int = 32,
                    dim: int = 256) -> np.ndarray:
    """``[S, L, L]`` per-utterance d(l, n) tables of ``num_samples`` random streams with these layer strengths."""
    states = [rng.standard_normal((num_samples, 1, dim))]
    for strength in strengths:
        states.append(states[-1] + strength * rng.standard_normal((num_samples, 1, dim)))
    metric = AngularDistanceMetric(len(strengths), keep_per_sample=True)
    metric.update([torch.from_numpy(state) for state in states], torch.ones(num_samples, 1, dtype=torch.bool))
    return metric.compute_per_sample().double().numpy()


def map_pair(seed: int, related: bool, layers: int = LAYERS, num_samples: int = 32,
             dim: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance tables ``([S, L, L], [S, L, L])`` of two maps, related (shared strengths) or not."""
    rng = np.random.default_rng(seed)
    first = layer_strengths(rng, layers)
    second = first if related else layer_strengths(rng, layers)
    return (per_sample_maps(first, rng, num_samples, dim), per_sample_maps(second, rng, num_samples, dim))


def paired_per_sample_maps(strengths_a: np.ndarray, strengths_b: np.ndarray, rng: np.random.Generator,
                           num_samples: int = 32, dim: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Two maps of the *same* utterances (same ``x^0`` and noise, two sets of layer strengths), like the speech and
    text maps of one set: row i of both ``[S, L, L]`` arrays is utterance i."""
    noise = rng.standard_normal((len(strengths_a) + 1, num_samples, 1, dim))
    tables = []
    for strengths in (strengths_a, strengths_b):
        states = [noise[0]]
        for layer, strength in enumerate(strengths):
            states.append(states[-1] + strength * noise[layer + 1])
        metric = AngularDistanceMetric(len(strengths), keep_per_sample=True)
        metric.update([torch.from_numpy(state) for state in states], torch.ones(num_samples, 1, dtype=torch.bool))
        tables.append(metric.compute_per_sample().double().numpy())
    return tables[0], tables[1]
