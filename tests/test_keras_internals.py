"""Keras' private names and undocumented behaviour that gemma_keras relies on
(gemma_keras/keras_internals.py), each probed against the installed Keras: a Keras release
that changes one fails here, naming it, before a user meets it in a load or a quantize.
And nothing outside keras_internals.py reaches into Keras' privates.
"""

import pathlib
import re

import keras
import numpy as np
import pytest

from gemma_keras import keras_internals as ki

REPO = pathlib.Path(__file__).resolve().parents[1]


def changed(what):
    return (f"Keras {keras.__version__} changed {what}, which gemma_keras/keras_internals.py "
            "relies on: adapt that module (and add this version to TESTED_KERAS once the "
            "suite passes on it).")


def test_keras_is_a_tested_minor_version_and_pyproject_pins_those():
    assert ki.keras_version_tested(), (
        f"Keras {keras.__version__} is not a minor version the suite has run on "
        f"({ki.TESTED_KERAS}); run the suite on it, then add it to TESTED_KERAS and "
        "pyproject's keras requirement.")
    requirement = re.search(r'"keras(>=[^"]+)"', (REPO / "pyproject.toml").read_text())
    assert requirement, "pyproject.toml does not list keras"
    lowest, highest = min(ki.TESTED_KERAS), max(ki.TESTED_KERAS)
    major, minor = highest.split(".")
    assert requirement.group(1) == f">={lowest},<{major}.{int(minor) + 1}", (
        f"pyproject's keras{requirement.group(1)} should allow exactly the tested minor "
        f"versions {ki.TESTED_KERAS}")


def _dense(name="query", units=8):
    layer = keras.layers.EinsumDense("btd,df->btf", output_shape=(None, units), name=name)
    layer.build((None, None, 16))
    return layer


def test_quantize_filters_and_block_size():
    layer = _dense("query")
    assert ki.quantize_filter(layer, None), changed("should_quantize_layer(layer, None)")
    assert ki.quantize_filter(layer, "quer") and not ki.quantize_filter(layer, "value"), \
        changed("should_quantize_layer with a regex")
    assert ki.quantize_filter(layer, ["x", "query"]), changed("should_quantize_layer, list")
    assert not ki.quantize_filter(layer, lambda l: l.name == "value"), \
        changed("should_quantize_layer with a callable")
    config = keras.quantizers.Int4QuantizationConfig(block_size=64)
    assert ki.int4_block_size(layer, config) == 64, changed("get_block_size_for_layer")


def test_quantize_argument_check_and_after_quantize():
    layer = _dense()
    ki.check_quantize_args(layer, "int8")  # a float, built layer may be quantized
    layer.quantize("int8")
    with pytest.raises(ValueError):  # quantized twice: Keras' own error, before any change
        ki.check_quantize_args(layer, "int8")
    model = keras.Sequential([keras.Input((4, 16)), _dense()])
    assert callable(getattr(model, "_post_quantize", None)), changed("Model._post_quantize")
    ki.after_quantize(model, "int8")


def test_variables_can_be_replaced_while_unlocked():
    layer = _dense()
    assert hasattr(layer, "_tracker") and hasattr(layer._tracker, "unlock"), \
        changed("Layer._tracker.unlock/lock")
    with ki.variables_unlocked(layer):
        layer.extra = layer.add_weight(shape=(2,), initializer="ones", name="extra")
    assert any(v.path.endswith("extra") for v in layer.weights)
    before = len(layer.weights)
    ki.untrack_variable(layer, layer.extra)
    assert len(layer.weights) == before - 1, changed("Layer._untrack_variable")
    ki.retrack_variables(layer)


def test_embedding_table_is_the_stored_table():
    table = keras.layers.ReversibleEmbedding(10, 8, tie_weights=True)
    table.build((None, None))
    assert ki.EMBEDDINGS_ATTR in vars(table) or hasattr(table, ki.EMBEDDINGS_ATTR), \
        changed("ReversibleEmbedding._embeddings")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(ki.embedding_table(table)),
                                  keras.ops.convert_to_numpy(table.embeddings))
    table.quantize("int8")
    assert keras.backend.standardize_dtype(ki.embedding_table(table).dtype) == "int8", \
        changed("the quantized table's variable (ReversibleEmbedding._embeddings)")


def test_stored_value_even_in_a_stateless_scope():
    variable = keras.Variable(np.ones(3, "float32"))
    with keras.StatelessScope(state_mapping=[(variable, np.zeros(3, "float32"))]):
        assert keras.ops.convert_to_numpy(variable.value).sum() == 0
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ki.stored_value(variable)),
                                      np.ones(3), err_msg=changed("Variable._value"))


def test_sublayers_are_every_nested_layer():
    inner = keras.Sequential([keras.layers.Dense(2, name="a"), keras.layers.Dense(2, name="b")],
                             name="inner")
    outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(2, name="c")])
    names = {l.name for l in ki.sublayers(outer)
             if not isinstance(l, keras.layers.InputLayer)}
    assert names == {"inner", "a", "b", "c"}, changed("Model._flatten_layers")
    assert {l.name for l in ki.sublayers(outer, recursive=False)
            if not isinstance(l, keras.layers.InputLayer)} == {"inner", "c"}


def test_keep_input_dtypes_stops_the_cast_to_the_compute_dtype():
    class Seen(keras.layers.Layer):
        def call(self, x):
            self.seen = keras.backend.standardize_dtype(x.dtype)
            return x

    cast, kept = Seen(dtype="bfloat16"), Seen(dtype="bfloat16")
    ki.keep_input_dtypes(kept)
    x = keras.ops.ones((2, 2), "float32")
    cast(x), kept(x)
    assert cast.seen == "bfloat16", changed("Layer's input cast (the probe itself)")
    assert kept.seen == "float32", changed("Layer._convert_input_args")


def test_after_build_runs_once_right_after_the_build():
    layer = keras.layers.Dense(2)
    assert "build" in vars(layer), changed("the per-instance build wrapper of a Layer")
    seen, keras_build = [], layer.build
    ki.after_build(layer, lambda l: seen.append(l.built))
    layer.build((None, 3))
    assert seen == [True], changed("Layer.build's instance wrapper")
    assert layer.build is keras_build  # the hook ran once and is gone
    other = keras.layers.Dense(2)
    keras_build = other.build
    ki.after_build(other, lambda l: seen.append("never"))
    ki.undo_after_build(other)
    assert other.build is keras_build


def test_quantize_arguments_are_checked_before_keras_resolves_them():
    class Model(keras.Sequential):
        def quantize(self, mode=None, config=None, filters=None, **kwargs):
            """our docstring"""
            calls.append(("method", mode, config))

    calls = []
    model = Model([keras.Input((3,)), keras.layers.Dense(2)])
    assert "quantize" in vars(model), changed("the per-instance quantize wrapper of a Model")

    def check(mode, config, filters, block_size, kwargs):
        calls.append(("check", mode, block_size))
        return mode, keras.quantizers.Int4QuantizationConfig(block_size=block_size)

    ki.check_quantize_arguments_first(model, check)
    model.quantize("int4", block_size=32)
    assert calls[0] == ("check", "int4", 32)
    assert calls[1][0] == "method" and calls[1][2].block_size == 32, \
        changed("Model.quantize's instance wrapper (config passed on)")
    assert model.quantize.__doc__ == "our docstring"


def test_the_einsum_dense_members_linear_overrides_exist():
    layer = _dense()
    missing = [name for name in ki.OVERRIDDEN_EINSUM_DENSE if not hasattr(layer, name)]
    assert not missing, changed(f"EinsumDense ({missing}), which layers/linear.py overrides")


# Keras private names gemma_keras uses, wrapped in keras_internals.py. A new one goes there
# (with a probe above) and on this list.
PRIVATE = ("_flatten_layers", "_tracker", "_post_quantize", "_check_quantize_args",
           "_untrack_variable", "_convert_input_args", "_track_variables", "_embeddings",
           "_value")


def test_keras_privates_are_used_in_keras_internals_only():
    found = []
    pattern = re.compile(r"keras\.src|\.(" + "|".join(PRIVATE) + r")\b")
    for path in sorted((REPO / "gemma_keras").rglob("*.py")):
        if path.name == "keras_internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "Keras privates outside gemma_keras/keras_internals.py:\n" + \
        "\n".join(found)
