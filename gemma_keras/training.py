"""What `GemmaCausalLM.compile` and `fit` add to Keras: default optimizer, loss and metrics for
next-token training, and turning strings, prompt/response dicts, tf.data datasets and Python
generators into (features, labels, sample_weight) batches."""

from __future__ import annotations

import collections.abc
import sys
import types

import keras
import numpy as np

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
def adapt(lm, x, y=None, sample_weight=None, batch_size=None):
    """Returns the (x, y, sample_weight, batch_size) to hand to keras.Model.fit/evaluate."""
    _check_data(x)
    if _is_tf_dataset(x):
        return _dataset(lm, x, batch_size), None, None, None
    if _is_raw(x):
        features, labels, weights = _preprocessor(lm)(x)
        features, labels, weights = _trim(features, labels, weights)
        return features, labels, weights, batch_size
    if isinstance(x, dict) and "token_ids" in x and y is None:
        features, labels, weights = shift_for_next_token(x)
        return features, labels, weights, batch_size
    if isinstance(x, (types.GeneratorType, collections.abc.Iterator)):
        return _generator(lm, x, batch_size or 1), None, None, None
    return x, y, sample_weight, batch_size


_DATA_FORMS = ("a string, a list of strings, {'prompts': [...], 'responses': [...]}, a tf.data "
               "dataset, a generator, or {'token_ids', 'padding_mask'} arrays")


def _check_data(x):
    """Empty or mixed data as one clear error here, not an exception from deep inside Keras
    (an empty list used to end in `KeyError: 'pop from an empty set'`)."""
    from gemma_keras.errors import ArgumentTypeError, InvalidArgumentError

    if x is None:
        raise ArgumentTypeError(f"No training data: pass x as {_DATA_FORMS}.")
    if isinstance(x, (str, bytes)):
        if not x:
            raise InvalidArgumentError("The training text is empty; pass some text.")
        return
    if isinstance(x, dict):
        for key in ("prompts", "responses", "token_ids"):
            if key in x and len(x[key]) == 0:
                raise InvalidArgumentError(f"x[{key!r}] is empty: there is nothing to train on.")
        if "prompts" in x and "responses" in x and len(x["prompts"]) != len(x["responses"]):
            raise InvalidArgumentError(
                f"x has {len(x['prompts'])} prompts but {len(x['responses'])} responses; "
                "pass one response per prompt.")
        return
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.dtype.kind in "OSU"):
        if len(x) == 0:
            raise InvalidArgumentError(f"x is empty: there is nothing to train on. Pass "
                                       f"{_DATA_FORMS}.")
        kinds = {isinstance(v, (str, bytes)) for v in np.asarray(x, dtype=object).reshape(-1)}
        if kinds == {True, False}:
            raise ArgumentTypeError("x mixes strings with other values; pass a list of "
                                    "strings only.")


def adapt_validation(lm, data):
    """fit's validation_data in any form `adapt` takes (a tuple is (x, y[, weights]))."""
    if isinstance(data, tuple) and not _is_raw(data):
        return data
    x, y, weights, _ = adapt(lm, data)
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
        raise ValueError("Training on text needs a tokenizer: load the model with its "
                         "tokenizer, or pass {'token_ids', 'padding_mask'} arrays.")
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
    strings = spec["prompts"] if isinstance(spec, dict) else spec
    if strings.dtype != tf.string:
        raise TypeError(f"A tf.data dataset for fit() holds strings or {{'prompts', "
                        f"'responses'}} of strings, found {spec}.")
    if strings.shape.rank == 0:  # unbatched examples
        dataset = dataset.batch(batch_size or 32)
    return dataset.map(_preprocessor(lm).tf_map(), num_parallel_calls=tf.data.AUTOTUNE
                       ).prefetch(tf.data.AUTOTUNE)


def _generator(lm, items, batch_size):
    """Each item a string, a list of strings or a prompts/responses dict; single strings are
    grouped into batches of `batch_size`."""
    preprocessor = _preprocessor(lm)
    pending = []
    for item in items:
        if isinstance(item, (str, bytes)):
            pending.append(item)
            if len(pending) < batch_size:
                continue
            item, pending = pending, []
        yield preprocessor(item)
    if pending:
        yield preprocessor(pending)
