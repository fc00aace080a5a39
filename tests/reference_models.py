"""Plain NumPy/Python models of each clipper's rule, written from the papers' descriptions.

They work on the sequence of global norms alone: each ``step(norm)`` returns the
threshold the rule applies and the factor the update is scaled by. The tests
drive them and the JAX transformations with the same sequences.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


def _scale(norm: float, threshold: float) -> float:
    return threshold / norm if norm > threshold else 1.0


class PrototypeClipper:
    """Pascanu-style clipping as the PyTorch prototype did it, with our options."""

    def __init__(
        self,
        window: int = 32,
        num_std: float = 1.0,
        min_history: int | None = None,
        warmup_max_norm: float | None = None,
        max_norm: float | None = None,
        record: str = "raw",
    ) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.num_std = num_std
        self.min_history = window if min_history is None else min_history
        self.warmup_max_norm = warmup_max_norm
        self.max_norm = max_norm
        self.record = record
        self.recorded = 0

    def step(self, norm: float) -> tuple[float, float]:
        if self.recorded >= self.min_history:
            values = np.asarray(self.history, np.float64)
            threshold = values.mean() + self.num_std * values.std(ddof=1)
        elif self.warmup_max_norm is not None:
            threshold = self.warmup_max_norm
        else:
            threshold = math.inf
        if self.max_norm is not None:
            threshold = min(threshold, self.max_norm)
        self.history.append(min(norm, threshold) if self.record == "clipped" else norm)
        self.recorded += 1
        return threshold, _scale(norm, threshold)


class AutoClipper:
    """AutoClip: clip to a percentile of every norm seen so far, the current one included."""

    def __init__(self, percentile: float = 10.0, window: int = 1000) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.percentile = percentile

    def step(self, norm: float) -> tuple[float, float]:
        self.history.append(norm)
        threshold = float(np.percentile(np.asarray(self.history), self.percentile))
        return threshold, _scale(norm, threshold)


class ZClipper:
    """ZClip: z-score against EMAs initialised from the warmup norms."""

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        clip_option: str = "adaptive_scaling",
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
    ) -> None:
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.clip_option, self.skip_update_on_spike, self.eps = (
            clip_option,
            skip_update_on_spike,
            eps,
        )
        self.warmup_norms: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def step(self, norm: float) -> tuple[float, float]:
        if self.mean is None:
            self.warmup_norms.append(norm)
            if len(self.warmup_norms) == self.warmup_steps:
                self.mean = float(np.mean(self.warmup_norms))
                self.var = float(np.var(self.warmup_norms))
            return math.inf, 1.0
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        spike = z > self.z_thresh
        if spike:
            if self.clip_option == "mean":
                clip_value = self.mean
            else:
                clip_value = self.mean + self.z_thresh * std / (z / self.z_thresh)
            threshold = clip_value
        else:
            threshold = self.mean + self.z_thresh * (std + self.eps)
        if not (spike and self.skip_update_on_spike):
            applied = min(norm, threshold)
            self.mean = self.alpha * self.mean + (1 - self.alpha) * applied
            self.var = self.alpha * self.var + (1 - self.alpha) * (applied - self.mean) ** 2
        return threshold, _scale(norm, threshold)


class SpikeSkipper:
    """skip_on_spike's rule: skip when the norm exceeds mean + num_std * std (or max_norm)."""

    def __init__(
        self,
        window: int = 32,
        num_std: float = 6.0,
        record: str = "clipped",
        max_norm: float | None = None,
    ) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.window, self.num_std, self.record = window, num_std, record
        self.max_norm = math.inf if max_norm is None else max_norm
        self.recorded = 0

    def step(self, norm: float) -> tuple[float, bool]:
        if self.recorded >= self.window:
            values = np.asarray(self.history, np.float64)
            threshold = values.mean() + self.num_std * values.std(ddof=1)
        else:
            threshold = math.inf
        threshold = min(threshold, self.max_norm)
        skipped = norm > threshold
        self.history.append(min(norm, threshold) if self.record == "clipped" else norm)
        self.recorded += 1
        return threshold, skipped


def norm_sequence(rng: np.random.Generator, length: int, spike_every: int = 7) -> list[float]:
    """Log-normal norms with occasional spikes 10-1000x their neighbours."""
    norms = np.exp(rng.normal(0.0, 0.3, size=length))
    spikes = rng.random(length) < 1.0 / spike_every
    norms[spikes] *= 10.0 ** rng.uniform(1, 3, size=int(spikes.sum()))
    return [float(n) for n in norms]
