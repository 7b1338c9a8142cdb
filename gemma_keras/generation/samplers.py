"""Samplers: choose the next token of every row from its logits.

They run on the host with NumPy on the [batch, vocab] float32 logits of one step: the
compiled model step stays the same for every sampler (no recompilation when the user
switches from greedy to top-p), and a seeded `numpy.random.Generator` makes sampling
reproducible across calls. Across backends the same seed gives the same tokens when the
logits are the same: float32 models, not bfloat16 ones (see `GemmaCausalLM.generate`).

Besides the samplers, the host-side logits rules that `generate` applies before a sampler
(`repetition_penalty`, `min_new_tokens`) live here, and `build_sampler` turns generate's
`temperature=` / `top_k=` / `top_p=` / `min_p=` shortcuts into a sampler.

The rules run in transformers' order (`GenerationMixin._get_logits_processor`): the
repetition penalty and the min_new_tokens mask on the raw logits (`Decoding.adjust`), then
the sampler's own: divide by the temperature, keep the top k, keep the top-p nucleus, keep
the tokens whose probability is at least min_p times the top one's. So the distribution a
sampler draws from is softmax of transformers' processed scores for the same settings
(tests/test_sampling_reference.py holds them side by side).
"""

from __future__ import annotations

import numbers

import numpy as np

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError


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
    """Samples from softmax(logits / temperature); with min_p, among the tokens whose
    probability is at least min_p times the most likely token's (transformers'
    `MinPLogitsWarper`, applied after the temperature and any top-k / top-p cut)."""

    def __init__(self, temperature: float = 1.0, min_p: float = None):
        self.temperature = _number("temperature", temperature)
        if not self.temperature > 0:
            raise InvalidArgumentError(
                f"temperature must be > 0, got {temperature!r}; for deterministic decoding "
                "use greedy (leave sampler and temperature unset).")
        self.min_p = check_min_p(min_p)

    def filter(self, logits):
        """Logits already divided by the temperature, with the tokens this sampler excludes
        set to -inf: the sampler's own cut (`candidates`), then min_p."""
        logits = self.candidates(logits)
        return logits if self.min_p is None else _keep_min_p(logits, self.min_p)

    def candidates(self, logits):
        """The sampler's own cut before min_p (top-k, top-p); here none."""
        return logits

    def probs(self, logits):
        """The distribution this sampler draws from: [batch, vocab] float64, rows sum to 1.
        Speculative sampling accepts drafts against it."""
        # Divided (not multiplied): a temperature below 1 sharpens the distribution.
        scaled = self.filter(logits.astype(np.float64) / self.temperature)
        scaled -= scaled.max(axis=-1, keepdims=True)
        probs = np.exp(scaled)
        return probs / probs.sum(axis=-1, keepdims=True)

    def select(self, logits, rng):
        return draw(self.probs(logits), rng)


class TopKSampler(RandomSampler):
    """Samples among the k most likely tokens (every token tied with the k-th included,
    as transformers' `TopKLogitsWarper`)."""

    def __init__(self, k: int = 50, temperature: float = 1.0, min_p: float = None):
        super().__init__(temperature, min_p)
        self.k = _positive_int("top_k", k)

    def candidates(self, logits):
        return _keep_top_k(logits, self.k)


class TopPSampler(RandomSampler):
    """Nucleus sampling: the smallest set of most likely tokens whose mass reaches p;
    with k (keras-hub's argument), among the k most likely tokens only (transformers'
    `top_k` and `top_p` together)."""

    def __init__(self, p: float = 0.9, temperature: float = 1.0, k: int = None,
                 min_p: float = None):
        super().__init__(temperature, min_p)
        self.p = _number("top_p", p)
        if not 0 < self.p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {p!r}.")
        self.k = None if k is None else _positive_int("top_k", k)

    def candidates(self, logits):
        if self.k is not None:
            logits = _keep_top_k(logits, self.k)
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        # Keep a token when the mass before it is still below p (the first always stays).
        keep_sorted = (np.cumsum(probs, axis=-1) - probs) < self.p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        return np.where(keep, logits, -np.inf)


def draw(probs, rng):
    """One token per row of probs [batch, vocab] by inverse-CDF sampling: one uniform draw
    per row, so seeds reproduce exactly."""
    draws = rng.random(probs.shape[0])[:, None]
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((cdf < draws).sum(axis=-1), probs.shape[-1] - 1)


def _keep_min_p(logits, min_p):
    """logits [batch, vocab] with every token less likely than min_p times the row's most
    likely one set to -inf (the most likely always stays). As transformers compares
    probabilities, p(token) < min_p * p(top); here as exp(logit - top logit), the same
    ratio without the normalisation."""
    top = logits.max(axis=-1, keepdims=True)
    return np.where(np.exp(logits - top) < min_p, -np.inf, logits)


def _keep_top_k(logits, k):
    """logits [batch, vocab] with all but the k largest of each row set to -inf."""
    k = min(k, logits.shape[-1])
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]  # [batch, 1]
    return np.where(logits >= kth, logits, -np.inf)


class BeamSampler(Sampler):
    """keras-hub's `BeamSampler`, searched as transformers' beam search
    (`generate(num_beams=..., do_sample=False)`): `num_beams` hypotheses per prompt,
    finished ones scored sum of log-probs / (new tokens ** length_penalty).

    early_stopping: False (transformers' default: stop once no running beam is likely to
    beat the finished ones at its current length), True (stop as soon as num_beams
    hypotheses have finished) or "never" (stop only when no running beam could beat them at
    any length). return_all_beams: `generate` returns every beam with its score, best first.
    It chooses whole sequences, so only `generate` runs it (see generation/beam.py): not a
    stream, not a chat.
    """

    def __init__(self, num_beams: int = 5, length_penalty: float = 1.0,
                 early_stopping=False, return_all_beams: bool = False):
        self.num_beams = _positive_int("num_beams", num_beams)
        self.length_penalty = _number("length_penalty", length_penalty)
        if not np.isfinite(self.length_penalty):
            raise InvalidArgumentError(f"length_penalty must be a finite number (1.0: none, "
                                       f"> 1 favours longer, < 1 shorter), got {length_penalty!r}.")
        if not (isinstance(early_stopping, (bool, np.bool_)) or early_stopping == "never"):
            raise InvalidArgumentError(f"early_stopping must be True, False or 'never', got "
                                       f"{early_stopping!r}.")
        self.early_stopping = (early_stopping if isinstance(early_stopping, str)
                               else bool(early_stopping))
        if not isinstance(return_all_beams, (bool, np.bool_)):
            raise ArgumentTypeError(f"return_all_beams must be True or False, got "
                                    f"{return_all_beams!r}.")
        self.return_all_beams = bool(return_all_beams)

    def select(self, logits, rng):
        raise InvalidArgumentError("Beam search chooses whole sequences, not one token at a "
                                   "time: use it with generate() (not chat or a stream).")


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {value!r}.")
    return float(value)


def check_min_p(min_p):
    """None (no min-p cut) or a number in [0, 1], as a float (0 keeps every token)."""
    if min_p is None:
        return None
    value = _number("min_p", min_p)
    if not 0 <= value <= 1:  # also refuses nan
        raise InvalidArgumentError(
            f"min_p must be in [0, 1] (a fraction of the most likely token's probability; "
            f"0.05-0.1 is usual), got {min_p!r}.")
    return value


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be a whole number, got {value!r}.")
    if value < 1:
        raise InvalidArgumentError(f"{name} must be at least 1, got {value!r}.")
    return int(value)


_BY_NAME = {"greedy": GreedySampler, "random": RandomSampler, "top_k": TopKSampler,
            "top_p": TopPSampler, "beam": BeamSampler}
# The shortcuts each named sampler takes, and the constructor argument each one sets.
_SHORTCUTS = {"greedy": {}, "random": {"temperature": "temperature", "min_p": "min_p"},
              "top_k": {"temperature": "temperature", "top_k": "k", "min_p": "min_p"},
              "top_p": {"temperature": "temperature", "top_p": "p", "top_k": "k",
                        "min_p": "min_p"},
              "beam": {k: k for k in ("num_beams", "length_penalty", "early_stopping")}}


def get_sampler(sampler) -> Sampler:
    """A Sampler from an instance or a name: "greedy", "random", "top_k", "top_p", "beam"."""
    return build_sampler(sampler)


def build_sampler(sampler=None, temperature=None, top_k=None, top_p=None, num_beams=None,
                  length_penalty=None, early_stopping=None, min_p=None) -> Sampler:
    """The sampler `generate` uses, from its `sampler=` and the transformers-style shortcuts.

    sampler=None picks by the shortcuts given: top_p -> TopPSampler (with top_k, among the
    top k only), else top_k -> TopKSampler, else temperature or min_p -> RandomSampler,
    else num_beams -> BeamSampler (with length_penalty, early_stopping), else greedy.
    min_p goes with any of the three sampling ones.
    A sampler name takes the shortcuts it understands (`sampler="top_k", top_k=10`); a
    Sampler object takes none (set them on the object), so nothing is silently ignored.
    """
    given = {name: value for name, value in
             (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
              ("min_p", min_p), ("num_beams", num_beams), ("length_penalty", length_penalty),
              ("early_stopping", early_stopping))
             if value is not None}
    if isinstance(sampler, Sampler):
        if given:
            raise InvalidArgumentError(
                f"Pass either the sampler object {sampler!r} or {', '.join(given)}, not both; "
                f"set them on the object instead, e.g. TopPSampler(p=0.9, temperature=0.7).")
        return sampler
    if sampler is None:
        name = ("top_p" if "top_p" in given else "top_k" if "top_k" in given
                else "random" if "temperature" in given or "min_p" in given
                else "beam" if "num_beams" in given else "greedy")
    elif isinstance(sampler, str):
        if sampler not in _BY_NAME:
            raise InvalidArgumentError(
                f"Unknown sampler {sampler!r}; use one of {sorted(_BY_NAME)} or a "
                "gemma_keras.samplers.Sampler instance.")
        name = sampler
    else:
        raise ArgumentTypeError(
            f"sampler must be a name ({', '.join(sorted(_BY_NAME))}), a "
            f"gemma_keras.samplers.Sampler or None, got {sampler!r}.")
    unused = [k for k in given if k not in _SHORTCUTS[name]]
    if unused:
        raise InvalidArgumentError(
            f"sampler={name!r} takes no {' or '.join(unused)}; "
            + ("they set beam search: pass num_beams= (sampler unset or 'beam')."
               if all(k in _SHORTCUTS["beam"] for k in unused) else
               "leave sampler unset to sample with them." if name == "greedy" else
               f"it takes {', '.join(_SHORTCUTS[name])}."))
    return _BY_NAME[name](**{_SHORTCUTS[name][k]: v for k, v in given.items()})


# ---- logits rules applied on the host before the sampler ---------------------------------
def check_repetition_penalty(penalty):
    """None (no penalty) or a number > 0, as a float; 1.0 is no penalty."""
    if penalty is None:
        return None
    penalty = _number("repetition_penalty", penalty)
    if not penalty > 0 or not np.isfinite(penalty):
        raise InvalidArgumentError(
            f"repetition_penalty must be > 0 (1.0 is none, 1.1-1.3 is usual), got {penalty!r}.")
    return None if penalty == 1.0 else penalty


def apply_repetition_penalty(logits, contexts, penalty):
    """transformers' repetition penalty (Keskar et al. 2019): in row r, the logit of every
    token already in `contexts[r]` (the prompt and what was generated) is divided by
    `penalty` when positive and multiplied by it when negative, so a penalty > 1 always
    makes a seen token less likely. logits [batch, vocab] float32; returns a new array."""
    out = np.array(logits, "float32")  # a copy: the session's logits stay as computed
    vocab = out.shape[-1]
    for r, ids in enumerate(contexts):
        seen = np.unique(np.asarray(ids, "int64"))
        seen = seen[(seen >= 0) & (seen < vocab)]
        score = out[r, seen]
        out[r, seen] = np.where(score < 0, score * penalty, score / penalty)
    return out


def suppress(logits, rows, ids):
    """logits [batch, vocab] with `ids` set to -inf in the given rows (a new array)."""
    out = np.array(logits, "float32")
    ids = [i for i in ids if 0 <= i < out.shape[-1]]
    if rows and ids:
        out[np.ix_(list(rows), ids)] = -np.inf
    return out
