"""Samplers: choose the next token of every row from its logits.

They run on the host with NumPy on the [batch, vocab] float32 logits of one step: the
compiled model step stays the same for every sampler (no recompilation when the user
switches from greedy to top-p), and a seeded `numpy.random.Generator` makes sampling
reproducible across calls and identical on every backend.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    """Base class. Subclasses implement `select(logits, rng) -> ids [batch]`."""

    def select(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class GreedySampler(Sampler):
    def select(self, logits, rng):
        return np.argmax(logits, axis=-1)


class RandomSampler(Sampler):
    """Samples from softmax(logits / temperature)."""

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}; use "
                             "sampler='greedy' for deterministic decoding.")
        self.temperature = float(temperature)

    def filter(self, logits):
        """Logits with the tokens this sampler excludes set to -inf."""
        return logits

    def select(self, logits, rng):
        scaled = self.filter(logits.astype(np.float64) / self.temperature)
        scaled -= scaled.max(axis=-1, keepdims=True)
        probs = np.exp(scaled)
        probs /= probs.sum(axis=-1, keepdims=True)
        # Inverse-CDF sampling: one uniform draw per row, so seeds reproduce exactly.
        draws = rng.random(probs.shape[0])[:, None]
        cdf = np.cumsum(probs, axis=-1)
        return np.minimum((cdf < draws).sum(axis=-1), probs.shape[-1] - 1)


class TopKSampler(RandomSampler):
    """Samples among the k most likely tokens."""

    def __init__(self, k: int = 50, temperature: float = 1.0):
        super().__init__(temperature)
        if not (isinstance(k, int) and k > 0):
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        self.k = k

    def filter(self, logits):
        k = min(self.k, logits.shape[-1])
        kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
        return np.where(logits >= kth, logits, -np.inf)


class TopPSampler(RandomSampler):
    """Nucleus sampling: the smallest set of most likely tokens whose mass reaches p."""

    def __init__(self, p: float = 0.9, temperature: float = 1.0):
        super().__init__(temperature)
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p!r}.")
        self.p = float(p)

    def filter(self, logits):
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        # Keep a token when the mass before it is still below p (the first always stays).
        keep_sorted = (np.cumsum(probs, axis=-1) - probs) < self.p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        return np.where(keep, logits, -np.inf)


_BY_NAME = {"greedy": GreedySampler, "random": RandomSampler, "top_k": TopKSampler,
            "top_p": TopPSampler}


def get_sampler(sampler) -> Sampler:
    """A Sampler from an instance or a name: "greedy", "random", "top_k", "top_p"."""
    if isinstance(sampler, Sampler):
        return sampler
    if isinstance(sampler, str) and sampler in _BY_NAME:
        return _BY_NAME[sampler]()
    raise ValueError(f"Unknown sampler {sampler!r}; use one of {sorted(_BY_NAME)} or a "
                     "gemma_keras.samplers.Sampler instance.")
