"""The lm-evaluation-harness model `gemma_keras` (needs the `[eval]` extra: lm-eval).

    lm_eval --model gemma_keras ...            # once this module is imported, e.g.
    python -m gemma_keras.evaluation run --model gemma_keras \\
        --model_args preset=gemma2_2b_en,dtype=bfloat16 --tasks hellaswag
    gemma-keras eval --preset gemma2_2b_en --tasks hellaswag,./my_task.yaml

    lm_eval.simple_evaluate(model=GemmaKerasLM(lm=my_lm), tasks=[...])   # from Python

Requests are tokenized exactly as lm-eval's Hugging Face model (HFLM) tokenizes them for a
Gemma checkpoint (transformers' Gemma tokenizer, which adds <bos>), so `loglikelihood`,
`loglikelihood_rolling` and `generate_until` give HFLM's numbers for the same weights; the
scoring itself is `gemma_keras.evaluation.scoring` (each shared context prefilled once,
compiled, bucketed shapes).

model_args: preset (default: the bundled offline demo), dtype, quantize, block_size,
max_length (default: the model's context), max_gen_toks (default 256), seed (sampling in
generate_until; default 1234), batch_size (default 16; on lm-eval's command line give it as
`--batch_size N`, which lm-eval passes to every model), or lm= an already built
`GemmaCausalLM` instead of preset/dtype/quantize/block_size.

Differences from HFLM that remain: generated text is decoded by SentencePiece, which turns
only the invalid bytes of a run of byte pieces into U+FFFD where transformers turns the whole
run (the tokens are the same); do_sample without top_k samples from the whole distribution
(transformers' generate defaults to top_k=50).
"""

from __future__ import annotations

import contextlib
import dataclasses

from gemma_keras.errors import MissingExtraError

try:
    import lm_eval.api.model
    import lm_eval.api.registry
    from lm_eval import utils as lm_eval_utils
except ImportError as e:  # lm-eval is an optional extra
    raise MissingExtraError(
        'The lm-evaluation-harness model needs lm-eval: pip install "gemma-keras[eval]" '
        f"({e}).") from e

try:
    # Populates lm-eval's registry with its own (lazily loaded) models first: lm-eval 0.4.13
    # fills an empty registry on the first lookup, so registering `gemma_keras` into an empty
    # one would hide `--model hf` and every other built-in model afterwards.
    import lm_eval.models  # noqa: F401
except ImportError:  # an older lm-eval whose models need packages that are not installed
    pass

import numpy as np
from tqdm import tqdm

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError
from gemma_keras.generation.options import GenerateOptions, whole_number

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_SEED = 1234
# generate_until's gen_kwargs that are understood; lm-eval's aliases of max_gen_toks too
# (in its order of priority).
MAX_GEN_TOKS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
GEN_KWARGS = ("until", "do_sample", "temperature", "top_k", "top_p",
              "repetition_penalty") + MAX_GEN_TOKS_KEYS


def _git_commit_hash():
    """lm-eval's `get_git_commit_hash` (the results' "git_hash": `git describe --always` in
    the working directory, else the .git folder there), with git's stderr captured: outside
    a repository lm-eval's own lets git print "fatal: not a git repository" on the
    terminal, a line that looks like the evaluation failed. The value is the same."""
    import os
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    try:
        found = subprocess.run(["git", "describe", "--always"], capture_output=True,  # noqa: S607
                               check=True)
        return found.stdout.strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def quiet_git_hash():
    """Within it, lm-eval's `simple_evaluate` records the git hash without git's "fatal:"
    line (see `_git_commit_hash`). Scoped to `gemma-keras eval` and `python -m
    gemma_keras.evaluation` (the commands of this package), so importing this module leaves
    lm-eval as it is for everyone else; an lm-eval without that function is left alone."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:
        yield
        return
    evaluator.get_git_commit_hash = _git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _demo_preset():
    from gemma_keras.checkpoints.resolve import DEMO_PRESET

    return DEMO_PRESET


@lm_eval.api.registry.register_model("gemma_keras")
class GemmaKerasLM(lm_eval.api.model.TemplateLM):
    """A `GemmaCausalLM` as an lm-evaluation-harness model (see the module docstring)."""

    def __init__(self, preset=None, dtype=None, quantize=None, block_size=None,
                 batch_size=DEFAULT_BATCH_SIZE, max_length=None,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, seed=DEFAULT_SEED, lm=None,
                 device=None, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise InvalidArgumentError(
                f"Unknown model_args for gemma_keras: {', '.join(sorted(unknown))}. It takes "
                f"preset, dtype, quantize, block_size, batch_size, max_length, max_gen_toks, "
                f"seed (or lm= a GemmaCausalLM from Python).")
        # `device` and `max_batch_size` are lm-eval's command-line options, passed to every
        # model: Keras places the model itself, and batches are bucketed, never searched.
        del device, max_batch_size
        if lm is not None:
            given = [name for name, value in (("preset", preset), ("dtype", dtype),
                                              ("quantize", quantize),
                                              ("block_size", block_size))
                     if value is not None]
            if given:
                raise InvalidArgumentError(
                    f"model_args: give lm= (a built model) or {', '.join(given)} (to load "
                    f"one), not both.")
            if not hasattr(lm, "backbone") or not hasattr(lm, "generate"):
                raise ArgumentTypeError(f"lm must be a gemma_keras.GemmaCausalLM, got "
                                        f"{type(lm).__name__}.")
            self.preset = getattr(lm, "name", None) or type(lm).__name__
        else:
            lm, self.preset = self._load(preset, dtype, quantize, block_size)
        if lm.tokenizer is None:
            raise InvalidArgumentError(
                f"model_args preset={self.preset}: the model has no tokenizer, and "
                f"lm-evaluation-harness sends text; use a preset with its tokenizer.")
        self.lm = lm
        self._tokenizer = lm.tokenizer
        context = lm.backbone.config.max_sequence_length
        self._max_length = context if max_length is None else _whole(
            "max_length", max_length)
        if self._max_length > context:
            raise InvalidArgumentError(
                f"model_args max_length={self._max_length} is more than the model's context "
                f"of {context}; leave it out or lower it.")
        self._batch_size = _batch_size(batch_size)
        self.max_gen_toks = _whole("max_gen_toks", max_gen_toks)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ArgumentTypeError(f"model_args seed must be a whole number, got {seed!r}.")
        self.seed = int(seed)
        # Special pieces that transformers' Gemma tokenizer reads as one token wherever they
        # appear in text (SentencePiece never produces control pieces from text): <bos> at
        # the start of a chat-templated prompt above all.
        t = self._tokenizer
        self._special = {t.id_to_token(i): i for i in dict.fromkeys(
            (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id))}

    @staticmethod
    def _load(preset, dtype, quantize, block_size):
        from gemma_keras.causal_lm import GemmaCausalLM

        preset = _demo_preset() if preset is None else preset
        if not isinstance(preset, str) or not preset:
            raise ArgumentTypeError(f"model_args preset must be a preset name, handle or "
                                    f"directory, got {preset!r}.")
        if isinstance(quantize, str) and quantize.lower() == "none":
            quantize = None
        block_size = 128 if block_size is None else block_size
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
            raise ArgumentTypeError(f"model_args block_size must be a whole number, got "
                                    f"{block_size!r}.")
        return GemmaCausalLM.from_preset(
            preset, dtype=dtype, quantize=quantize,
            block_size=None if block_size == -1 else int(block_size)), preset

    # ---- what lm-eval asks of a model ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context and the first rolling window are conditioned on.
        return self._tokenizer.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        # lm-eval keys its request cache by it when a chat template is applied.
        return f"gemma_keras-{self.preset}".replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None,
                   **kwargs):
        """HFLM's tokenization with transformers' Gemma tokenizer: <bos> first unless the
        string already starts with "<bos>" (add_special_tokens None), or as add_special_tokens
        says; special pieces written in the text are one token each."""
        if not isinstance(string, str):
            raise ArgumentTypeError(f"tok_encode takes a string, got {type(string).__name__}.")
        bos_text = self._tokenizer.id_to_token(self.prefix_token_id)
        add_bos = (not string.startswith(bos_text) if add_special_tokens is None
                   else bool(add_special_tokens))
        ids = ([self.prefix_token_id] if add_bos else []) + self._encode_text(string)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def _encode_text(self, text):
        """Ids of `text`, each special piece's text read as that piece, as transformers splits
        text on its added special tokens before the SentencePiece model sees each part."""
        ids, start = [], 0
        while True:
            found = [(text.find(piece, start), piece) for piece in self._special]
            found = [(at, piece) for at, piece in found if at >= 0]
            if not found:
                break
            at, piece = min(found, key=lambda f: (f[0], -len(f[1])))
            if at > start:
                ids += self._tokenizer.tokenize(text[start:at])
            ids.append(self._special[piece])
            start = at + len(piece)
        if start < len(text):
            ids += self._tokenizer.tokenize(text[start:])
        return ids

    def tok_decode(self, tokens, skip_special_tokens=True):
        """Text of `tokens`; without skip_special_tokens, special pieces are written out
        ("<eos>"), as transformers' decode writes them."""
        tokens = [int(tokens)] if np.isscalar(tokens) else [int(t) for t in tokens]
        if skip_special_tokens:
            return self._tokenizer.detokenize(tokens, skip_special=True)
        special = {i: piece for piece, i in self._special.items()}
        text, run = "", []
        for token in tokens + [None]:
            if token is None or token in special:
                text += self._tokenizer.detokenize(run) if run else ""
                text += special.get(token, "")
                run = []
            else:
                run.append(token)
        return text

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: [((context, continuation) or None, context ids, continuation ids)] ->
        [(log-likelihood, is_greedy)]."""
        from gemma_keras.evaluation import scoring

        requests = list(requests)
        results = [None] * len(requests)
        pairs, where = [], []
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) == 0:  # nothing to score, as HFLM's empty slice sums to 0
                results[i] = (0.0, True)
            else:
                pairs.append((context, continuation))
                where.append(i)
        with tqdm(total=len(requests), disable=disable_tqdm,
                  desc="Running loglikelihood requests") as bar:
            bar.update(len(requests) - len(pairs))
            scores = scoring.loglikelihood_tokens(self.lm, pairs, batch_size=self._batch_size,
                                                  max_length=self._max_length,
                                                  progress=bar.update)
        for i, score in zip(where, scores):
            results[i] = score
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """The log-likelihood of each whole text, in lm-eval's disjoint rolling windows of
        max_length tokens over tok_encode(text) (which starts with <bos>, so the first window
        also scores that <bos> after the prefix <bos>, as HFLM does)."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for window in lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1):
                context, continuation = lm_eval_utils.make_disjoint_window(window)
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (value, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Each request's (context, gen_kwargs): the completion of the context, cut at the
        first of gen_kwargs["until"] (and ended by <eos>). Greedy unless do_sample (or a
        temperature > 0 without do_sample) asks for sampling. Requests with the same
        gen_kwargs are batched, `batch_size` at a time, longest first."""
        groups = {}  # gen_kwargs (as a hashable key) -> request indices
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            if not isinstance(context, str):
                raise ArgumentTypeError(f"generate_until: a request's context must be a "
                                        f"string, got {type(context).__name__}.")
            groups.setdefault(_freeze(gen_kwargs), []).append(i)
        results = [None] * len(requests)
        rng = np.random.default_rng(self.seed)  # a seed per batch: reproducible runs
        with tqdm(total=len(requests), disable=disable_tqdm,
                  desc="Running generate_until requests") as bar:
            for indices in groups.values():
                until, options = self._generation_options(requests[indices[0]].args[1])
                contexts = {i: self.tok_encode(requests[i].args[0]) for i in indices}
                indices = sorted(indices, key=lambda i: -len(contexts[i]))
                for start in range(0, len(indices), self._batch_size):
                    batch = indices[start:start + self._batch_size]
                    seed = int(rng.integers(2 ** 31))
                    texts = self._generate([contexts[i] for i in batch], until,
                                           dataclasses.replace(options, seed=seed))
                    for i, text in zip(batch, texts):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return results

    def _generation_options(self, gen_kwargs):
        """gen_kwargs as lm-eval normalizes them -> (the stop strings, generate's options):
        the completion alone, the context as it is (lm-eval applies the chat template
        itself with --apply_chat_template)."""
        if not isinstance(gen_kwargs, dict):
            raise ArgumentTypeError(f"generate_until: gen_kwargs must be a dict, got "
                                    f"{type(gen_kwargs).__name__}.")
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise InvalidArgumentError(
                f"generate_until: unsupported gen_kwargs {', '.join(unknown)}; gemma_keras "
                f"understands {', '.join(GEN_KWARGS)}. Remove them from the task's "
                f"generation_kwargs (or --gen_kwargs).")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(s, str) for s in until):
            raise ArgumentTypeError(f"generate_until: until must be a string or a list of "
                                    f"strings, got {gen_kwargs['until']!r}.")
        new = next((gen_kwargs[k] for k in MAX_GEN_TOKS_KEYS if gen_kwargs.get(k) is not None),
                   self.max_gen_toks)
        new = _whole("max_gen_toks", int(new) if isinstance(new, float) and new.is_integer()
                     else new)
        if new >= self._max_length:
            raise InvalidArgumentError(
                f"generate_until: max_gen_toks={new} leaves no room for the context in "
                f"max_length={self._max_length}; lower max_gen_toks.")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        sample = temperature > 0.0 if do_sample is None else bool(do_sample)
        until = [s for s in until if s]
        if sample and temperature > 0.0:
            # generate picks the sampler from these, as transformers does (top_p, else
            # top_k, else plain sampling at the temperature).
            sampling = dict(temperature=temperature, top_k=gen_kwargs.get("top_k"),
                            top_p=gen_kwargs.get("top_p"))
        else:
            # Greedy: do_sample False, or a temperature of 0 (the limit of sampling).
            sampling = dict(sampler="greedy")
        return until, GenerateOptions(
            max_new_tokens=new, stop_strings=until or None, include_prompt=False,
            chat_template=False, repetition_penalty=gen_kwargs.get("repetition_penalty"),
            **sampling)

    def _generate(self, contexts, until, options):
        # Contexts lose their oldest tokens to leave room for the new ones, as HFLM's.
        room = self._max_length - options.max_new_tokens
        contexts = [c[-room:] for c in contexts]
        width = max(len(c) for c in contexts)
        ids = np.zeros((len(contexts), width), "int32")
        mask = np.zeros((len(contexts), width), bool)
        for r, context in enumerate(contexts):
            ids[r, :len(context)] = context
            mask[r, :len(context)] = True
        stop_ids = [self.eot_token_id]
        if self.lm.instruct and self._tokenizer.end_of_turn_id is not None:
            # An instruct model ends its turn with <end_of_turn> (transformers' generation
            # config for Gemma's instruct checkpoints stops on it too).
            stop_ids.append(self._tokenizer.end_of_turn_id)
        out = self.lm.generate({"token_ids": ids, "padding_mask": mask},
                               options=dataclasses.replace(options, stop_token_ids=stop_ids))
        texts = []
        for row, keep in zip(np.asarray(out["token_ids"]), np.asarray(out["padding_mask"])):
            text = self.tok_decode(row[keep].tolist())
            for stop in until:  # lm-eval's cut: at each stop string in turn
                text = text.split(stop)[0]
            texts.append(text)
        return texts

    # ---- chat template (lm-eval's --apply_chat_template) ---------------------------------
    def chat_template(self, chat_template=False):
        """The chat template lm-eval records in its results: transformers' Jinja form of
        Gemma's turn format (what `apply_chat_template` writes)."""
        if chat_template is False or chat_template is None:
            return None
        self._check_chat_pieces()
        from gemma_keras.checkpoints.hf_writer import CHAT_TEMPLATE

        return CHAT_TEMPLATE

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """[{"role", "content"}, ...] -> "<bos>" + the conversation in Gemma's chat format, as
        transformers writes it with a Gemma chat template: no system role (a system message
        goes before the next user message, after a blank line), "assistant" is the "model"
        turn; without add_generation_prompt the last message is left open, to be continued
        (transformers' continue_final_message)."""
        from gemma_keras.tokenizer import format_chat

        self._check_chat_pieces()
        messages = []
        for i, message in enumerate(chat_history):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise ArgumentTypeError(f"chat_history[{i}] must be a dict with a string "
                                        f"'content', got {message!r:.80}.")
            if message.get("role") not in ("system", "user", "assistant", "model"):
                raise InvalidArgumentError(f"chat_history[{i}]: role must be system, user or "
                                           f"assistant, got {message.get('role')!r}.")
            messages.append({"role": message["role"], "content": message["content"]})
        bos = self._tokenizer.id_to_token(self.prefix_token_id)
        if add_generation_prompt or not messages or messages[-1]["role"] == "system":
            return bos + format_chat(messages, add_generation_prompt=add_generation_prompt)
        # The last message left open, as transformers' continue_final_message: the
        # conversation in the chat format, without the last turn's closing marker.
        closed = format_chat(messages, add_generation_prompt=False)
        return bos + closed[: -len("<end_of_turn>\n")]

    def _check_chat_pieces(self):
        if self._tokenizer.start_of_turn_id is None or self._tokenizer.end_of_turn_id is None:
            raise InvalidArgumentError(
                f"--apply_chat_template: {self.preset}'s tokenizer has no <start_of_turn> / "
                f"<end_of_turn> pieces, so it has no chat format; evaluate without it.")

    def get_model_info(self) -> dict:
        """What lm-eval records about the model in its results."""
        config = self.lm.backbone.config
        return {"preset": self.preset, "architecture": config.describe(),
                "dtype": self.lm.backbone.dtype_policy.name, "instruct": self.lm.instruct}


def _freeze(value):
    """A hashable, order-free stand-in of gen_kwargs (dicts and lists inside)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _whole(name, value):
    return whole_number(f"model_args {name}",
                        value.item() if isinstance(value, np.generic) else value, 1)


def _batch_size(value):
    """lm-eval passes --batch_size as given: a number, its text, or "auto" (which here is
    the default: shapes are bucketed, there is no largest batch to search for)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("auto"):
            return DEFAULT_BATCH_SIZE
        if not text.isdigit():
            raise ArgumentTypeError(f"batch_size must be a whole number (or auto), got "
                                    f"{value!r}.")
        value = int(text)
    return _whole("batch_size", value)
