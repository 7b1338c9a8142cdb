"""What `GemmaCausalLM.compile` and `fit` add to Keras: default optimizer, loss and metrics for
next-token training, and turning strings, prompt/response dicts, tf.data datasets and Python
generators into (features, labels, sample_weight) batches."""

from __future__ import annotations

import collections.abc
import numbers
import sys
import types

import keras
import numpy as np

from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError

# AdamW learning rates: adapters take a larger step than full fine-tuning (as in the Gemma
# LoRA guides); weight decay skips norm scales.
LORA_LEARNING_RATE = 2e-4
FULL_LEARNING_RATE = 2e-5


class Perplexity(keras.metrics.Metric):
    """exp of the mean (sample-weighted) next-token cross-entropy over all seen labels."""

    def __init__(self, name="perplexity", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable((), initializer="zeros", name="total", dtype="float32")
        self.count = self.add_variable((), initializer="zeros", name="count", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        losses = keras.losses.sparse_categorical_crossentropy(
            y_true, keras.ops.cast(y_pred, "float32"), from_logits=True)  # [batch, len]
        weight = (keras.ops.ones_like(losses) if sample_weight is None
                  else keras.ops.cast(sample_weight, "float32"))
        self.total.assign_add(keras.ops.sum(losses * weight))
        self.count.assign_add(keras.ops.sum(weight))

    def result(self):
        return keras.ops.exp(self.total / keras.ops.maximum(self.count, 1.0))

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)


def default_optimizer(lm):
    from gemma_keras.lora import lora_state

    lora = lora_state(lm.backbone) is not None
    optimizer = keras.optimizers.AdamW(
        learning_rate=LORA_LEARNING_RATE if lora else FULL_LEARNING_RATE, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["scale"])
    return optimizer


def loss_scaled(lm, optimizer, auto_scale_loss=True):
    """`optimizer` wrapped in Keras' LossScaleOptimizer when the model computes in float16:
    its gradients underflow without loss scaling; bfloat16 and float32 do not. Keras does this
    itself only for the "mixed_float16" policy; a model loaded with dtype="float16" has the
    "float16" one."""
    if optimizer is None:
        return None
    optimizer = keras.optimizers.get(optimizer)
    if (auto_scale_loss and lm.dtype_policy.compute_dtype == "float16"
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def default_loss():
    # Cross-entropy computed in float32 (Keras casts the logits to the loss dtype), averaged
    # over the weighted labels only: padding and prompt tokens count neither in the sum nor
    # in the denominator, so extra padding never changes the loss.
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight")


class Accuracy(keras.metrics.SparseCategoricalAccuracy):
    """Next-token accuracy on float32 logits. Keras' metric casts the labels to the logits'
    dtype before comparing them with the argmax; in bfloat16 ids above 256 round (257 ->
    256), so neighbouring tokens counted as right (gemma_demo held out in bfloat16: 47.48%
    reported, 46.05% true)."""

    def __init__(self, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true, keras.ops.cast(y_pred, "float32"), sample_weight)


def default_metrics():
    return [Accuracy(), Perplexity()]


# ---- data ---------------------------------------------------------------------------------
def adapt(lm, x, y=None, sample_weight=None, batch_size=None, name="x"):
    """Returns the (x, y, sample_weight, batch_size) to hand to keras.Model.fit/evaluate.
    `name` is the argument the data came in (x, validation_data), for the errors."""
    from gemma_keras.preprocessor import records_to_columns

    x = records_to_columns(x, name)
    _check_data(x, name)
    batch_size = _batch_size(batch_size)
    if _is_tf_dataset(x):
        return _dataset(lm, x, batch_size), None, None, None
    if _is_raw(x):
        for given, value in (("y", y), ("sample_weight", sample_weight)):
            if value is not None:
                raise InvalidArgumentError(
                    f"{given} was passed with text data: the labels and their weights come "
                    f"from the text itself (the next token, on responses only). Drop {given}, "
                    "or pass tokenized {'token_ids', 'padding_mask'} arrays with it.")
        features, labels, weights = _preprocessor(lm)(x)
        features, labels, weights = _trim(features, labels, weights)
        return features, labels, weights, batch_size
    if isinstance(x, dict) and "token_ids" in x and y is None:
        features, labels, weights = shift_for_next_token(x)
        return features, labels, weights, batch_size
    if isinstance(x, (types.GeneratorType, collections.abc.Iterator)):
        return _generator(lm, x, batch_size or 1), None, None, None
    return x, y, sample_weight, batch_size


_DATA_FORMS = ("a string, a list of strings, {'prompts': [...], 'responses': [...]}, a list of "
               "{'prompt': ..., 'response': ...} or {'text': ...} records (JSONL lines), a "
               "tf.data dataset, a generator, or {'token_ids', 'padding_mask'} arrays")
_TOKENIZED_KEYS = ("token_ids", "padding_mask")


def _check_data(x, name="x"):
    """Every form fit() does not take, as one clear error here, not an exception from deep
    inside Keras (`ValueError: Unrecognized data type`, or for an empty list
    `KeyError: 'pop from an empty set'`)."""
    if x is None:
        raise ArgumentTypeError(f"No training data: pass {name} as {_DATA_FORMS}.")
    if isinstance(x, (str, bytes)):
        if not x:
            raise InvalidArgumentError(f"The training text ({name}) is empty; pass some text.")
        return
    if isinstance(x, dict):
        _check_dict(x, name)
        return
    if isinstance(x, (list, tuple, np.ndarray)):
        if len(x) == 0:
            raise InvalidArgumentError(f"{name} is empty: there is nothing to train on. Pass "
                                       f"{_DATA_FORMS}.")
        if isinstance(x, np.ndarray) and x.dtype.kind not in "OSU":
            values = x.reshape(-1)[:1]  # numbers: refused below, without a copy of them all
        else:
            try:
                values = np.asarray(x, dtype=object).reshape(-1)
            except ValueError:  # ragged nesting
                values = list(x)
        kinds = {isinstance(v, (str, bytes)) for v in values}
        if kinds == {True, False}:
            raise ArgumentTypeError(f"{name} mixes strings with other values; pass a list of "
                                    "strings only.")
        if kinds == {False}:
            first = next(v for v in values if not isinstance(v, (str, bytes)))
            raise ArgumentTypeError(
                f"{name} holds {type(first).__name__} values, not text: fit() takes "
                f"{_DATA_FORMS}. Token ids go in the dict {{'token_ids': [batch, length] "
                "ints, 'padding_mask': ...}.")
        return
    if isinstance(x, (numbers.Number, np.generic)):
        raise ArgumentTypeError(f"{name}={x!r} is not training data: pass {_DATA_FORMS}.")
    # Anything else (generators, tf.data datasets, keras.utils.PyDataset, a torch DataLoader)
    # is checked item by item, or is Keras' own.


def _check_dict(x, name):
    keys = sorted(map(str, x))
    if "token_ids" in x:
        extra = [k for k in keys if k not in _TOKENIZED_KEYS]
        if extra:
            raise InvalidArgumentError(f"{name} has the keys {keys}: tokenized data takes only "
                                       f"{list(_TOKENIZED_KEYS)}.")
        if isinstance(x["token_ids"], (list, tuple, np.ndarray)):
            try:
                ids = np.asarray(x["token_ids"])
                found = f"{ids.dtype} values of shape {ids.shape}"
            except ValueError:  # NumPy refuses ragged nesting
                ids, found = None, "rows of different lengths"
            if ids is None or ids.ndim != 2 or ids.dtype.kind not in "iu":
                raise ArgumentTypeError(
                    f"{name}['token_ids'] must be integer ids [batch, length] (pad rows to one "
                    f"length and mark the padding in 'padding_mask'), got {found}.")
            if ids.size == 0:
                raise InvalidArgumentError(f"{name}['token_ids'] is empty: there is nothing to "
                                           "train on.")
        return
    if "prompts" in x or "responses" in x:
        if set(x) != {"prompts", "responses"}:
            raise InvalidArgumentError(
                f"{name} has the keys {keys}: prompt/response pairs take exactly 'prompts' and "
                "'responses' (lists of strings, one response per prompt).")
        for key in ("prompts", "responses"):
            value = x[key]
            if isinstance(value, (str, bytes)):
                continue
            if not isinstance(value, (list, tuple, np.ndarray)) and not _is_tf_tensor(value):
                raise ArgumentTypeError(f"{name}[{key!r}] must be a list of strings, got "
                                        f"{type(value).__name__}.")
            if len(value) == 0:
                raise InvalidArgumentError(f"{name}[{key!r}] is empty: there is nothing to "
                                           "train on.")
        if len(_as_list(x["prompts"])) != len(_as_list(x["responses"])):
            raise InvalidArgumentError(
                f"{name} has {len(_as_list(x['prompts']))} prompts but "
                f"{len(_as_list(x['responses']))} responses; pass one response per prompt.")
        return
    if {"prompt", "response"} & set(x) or "text" in x:
        # The record's keys (a JSONL line): singular names one example, the dict of lists
        # takes the plural (keras-hub's names) so that each dict form has one spelling.
        raise InvalidArgumentError(
            f"{name} has the keys {keys}: a dict of training data takes the plural "
            "{'prompts': [...], 'responses': [...]} (keras-hub's names). The singular keys "
            "are those of one record: pass a list of records [{'prompt': ..., 'response': "
            "...}, ...] (or [{'text': ...}, ...]), as the lines of a JSONL file read with "
            "json.loads.")
    raise InvalidArgumentError(f"{name} has the keys {keys}; fit() takes {_DATA_FORMS}.")


def _as_list(value):
    return [value] if isinstance(value, (str, bytes)) else value


def _is_tf_tensor(value):
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(value, tf.Tensor)


def _batch_size(batch_size):
    if batch_size is None:
        return None
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral):
        raise ArgumentTypeError(f"batch_size must be a whole number of examples, got "
                                f"{batch_size!r}.")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}.")
    return int(batch_size)


def check_keras_arguments(method, kwargs):
    """fit()/evaluate()'s Keras keywords: an unknown one (`epoch=`) and a non-count `epochs`
    / `steps_per_epoch` / `steps` as gk errors naming them, before any work."""
    import inspect

    from gemma_keras.generation import options

    valid = [name for name in inspect.signature(method).parameters
             if name not in ("self", "x", "y", "batch_size", "sample_weight", "kwargs")]
    unknown = {name for name in kwargs if name not in valid and not name.startswith("_")}
    options.refuse_unknown_keywords(f"{method.__name__}()", unknown,
                                    ["x", "y", "batch_size", "sample_weight", *valid])
    for name, minimum in (("epochs", 1), ("initial_epoch", 0), ("steps_per_epoch", 1),
                          ("validation_steps", 1), ("steps", 1)):
        value = kwargs.get(name)
        if value is not None:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise ArgumentTypeError(f"{name} must be a whole number, got {value!r}.")
            if value < minimum:
                raise InvalidArgumentError(f"{name} must be at least {minimum}, got {value}.")


def adapt_validation(lm, data):
    """fit's validation_data in any form `adapt` takes (a tuple is (x, y[, weights]))."""
    if isinstance(data, tuple) and not _is_raw(data):
        return data
    x, y, weights, _ = adapt(lm, data, name="validation_data")
    return x if y is None else (x, y, weights)


def _is_raw(x):
    if isinstance(x, (str, bytes)):
        return True
    if isinstance(x, dict):
        return "prompts" in x or "responses" in x
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.dtype.kind in "OSU"):
        return len(x) > 0 and all(isinstance(v, (str, bytes)) for v in np.asarray(
            x, dtype=object).reshape(-1))
    return False


def _is_tf_dataset(x):
    # A tf.data dataset exists only once TensorFlow is imported; importing it here just to
    # ask would cost seconds (and its log lines) on JAX and PyTorch for every fit().
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, tf.data.Dataset)


def _preprocessor(lm):
    if lm.preprocessor is None:
        raise InvalidArgumentError("Training on text needs a tokenizer: load the model with "
                                   "its tokenizer, or pass {'token_ids', 'padding_mask'} "
                                   "arrays.")
    context = lm.backbone.config.max_sequence_length
    if lm.preprocessor.sequence_length > context:
        raise InvalidArgumentError(
            f"lm.preprocessor.sequence_length={lm.preprocessor.sequence_length} is longer "
            f"than the model's context of {context} tokens; set it to at most {context}.")
    return lm.preprocessor


def _trim(features, labels, weights):
    """Drops columns that are padding in every row, keeping a multiple of 64 so that
    datasets of similar lengths share one compiled step. Padding carries no weight, so the
    loss is unchanged; the step is shorter."""
    used = int(features["padding_mask"].any(axis=0).nonzero()[0].max(initial=0)) + 1
    keep = min(features["token_ids"].shape[1], -(-used // 64) * 64)
    return ({k: v[:, :keep] for k, v in features.items()}, labels[:, :keep],
            weights[:, :keep])


def shift_for_next_token(features):
    """Labels for already tokenized {"token_ids", "padding_mask"}: the next token, weighted
    where both it and its input are real."""
    ids = np.asarray(features["token_ids"]).astype("int32")
    mask = np.asarray(features.get("padding_mask", np.ones_like(ids))).astype(bool)
    labels = np.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    weights = np.zeros(ids.shape, "float32")
    weights[:, :-1] = mask[:, 1:] & mask[:, :-1]
    return {"token_ids": ids, "padding_mask": mask}, labels, weights


def _dataset(lm, dataset, batch_size):
    import tensorflow as tf

    spec = dataset.element_spec
    if isinstance(spec, tuple) or (isinstance(spec, dict) and "token_ids" in spec):
        return dataset  # already (features, labels[, weights]) or features
    if isinstance(spec, dict) and set(spec) != {"prompts", "responses"}:
        raise InvalidArgumentError(
            f"A tf.data dataset of dicts for fit() holds {{'prompts', 'responses'}} (plural) "
            f"or {{'token_ids', 'padding_mask'}}, found the keys {sorted(spec)}.")
    strings = spec["prompts"] if isinstance(spec, dict) else spec
    if not isinstance(strings, tf.TensorSpec) or strings.dtype != tf.string:
        raise ArgumentTypeError(f"A tf.data dataset for fit() holds strings or {{'prompts', "
                                f"'responses'}} of strings, found {spec}.")
    if strings.shape.rank == 0:  # unbatched examples
        dataset = dataset.batch(batch_size or 32)
    return dataset.map(_preprocessor(lm).tf_map(), num_parallel_calls=tf.data.AUTOTUNE
                       ).prefetch(tf.data.AUTOTUNE)


def _generator(lm, items, batch_size):
    """Each item a string, a list of strings or a prompts/responses dict; single strings are
    grouped into batches of `batch_size`."""
    from gemma_keras.preprocessor import records_to_columns

    preprocessor = _preprocessor(lm)
    pending = []
    for item in items:
        item = records_to_columns(item, "an item of the generator")
        if isinstance(item, (str, bytes)):
            pending.append(item)
            if len(pending) < batch_size:
                continue
            item, pending = pending, []
        yield preprocessor(item)
    if pending:
        yield preprocessor(pending)
