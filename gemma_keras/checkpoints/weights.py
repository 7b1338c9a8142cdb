"""The one table of a backbone's weights, and the loop that fills them from any reader.

Every checkpoint format is a mapping from these canonical names (keras-hub's layer names) to
arrays in keras layout; readers translate their own names and layouts, this module checks
shapes and assigns one tensor at a time so a load never holds a second copy of the model.
"""

from __future__ import annotations

import gc
from typing import Callable, Dict, Iterator, Tuple

import ml_dtypes
import numpy as np

from gemma_keras.errors import CheckpointError, WeightShapeError

# Sub-weights of a decoder block: canonical suffix -> attribute path from the block.
BLOCK_WEIGHTS = {
    "pre_attention_norm": ("pre_attention_norm", "scale"),
    "post_attention_norm": ("post_attention_norm", "scale"),
    "query": ("attention", "query", "kernel"),
    "key": ("attention", "key", "kernel"),
    "value": ("attention", "value", "kernel"),
    "attention_output": ("attention", "attention_output", "kernel"),
    "pre_ffw_norm": ("pre_ffw_norm", "scale"),
    "post_ffw_norm": ("post_ffw_norm", "scale"),
    "ffw_gating": ("ffw", "gating", "kernel"),
    "ffw_gating_2": ("ffw", "gating_2", "kernel"),
    "ffw_linear": ("ffw", "linear", "kernel"),
}


def weight_table(backbone) -> Iterator[Tuple[str, object]]:
    """(canonical name, keras variable) for every weight of the backbone, in a fixed order."""
    yield "token_embedding", backbone.token_embedding.embeddings
    for i, block in enumerate(backbone.transformer_layers):
        for suffix, attrs in BLOCK_WEIGHTS.items():
            obj = block
            for attr in attrs:
                obj = getattr(obj, attr)
                if obj is None:  # a post-norm this config does not have
                    break
            if obj is not None:
                yield f"decoder_block_{i}/{suffix}", obj
    yield "final_normalization", backbone.final_normalization.scale


# A reader: canonical name -> a function that reads that one array (keras layout) from disk.
Reader = Dict[str, Callable[[], np.ndarray]]


def load_into(backbone, reader: Reader, source: str) -> None:
    """Assigns every backbone weight from `reader`, checking names and shapes first."""
    table = list(weight_table(backbone))
    expected = {name for name, _ in table}
    missing = sorted(expected - set(reader))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"{source} lacks {len(missing)} weight(s) the config calls for: {shown}. "
            "The weights do not belong to this config, or the file is incomplete.")
    extra = sorted(set(reader) - expected)
    if extra:
        raise CheckpointError(
            f"{source} has weights the config does not call for: {', '.join(extra[:5])}. "
            "Check num_layers and the post-norm flags in config.json.")
    for name, variable in table:
        array = reader[name]()
        if tuple(array.shape) != tuple(variable.shape):
            raise WeightShapeError(
                f"{source}: weight '{name}' has shape {tuple(array.shape)} in the checkpoint "
                f"but the config calls for {tuple(variable.shape)}. The config and the "
                "weights do not match.")
        # Cast on the host, one tensor at a time, then let the array go before the next.
        variable.assign(array.astype(numpy_dtype(variable.dtype), copy=False))
        del array
    gc.collect()


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a keras dtype name; numpy itself has no bfloat16."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
