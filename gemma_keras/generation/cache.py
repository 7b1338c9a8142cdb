"""The key/value cache: explicit data passed into the model and returned updated.

Layout: a dict with one entry per attention kind that the config uses,
    {"global": {"positions": [batch, slots], "kv": [(key, value), ...]},
     "local":  {...}}
with key/value [batch, slots, kv_heads, head_dim] for each layer of that kind, in layer order.
`positions` holds the absolute position of the token in each slot, -1 for an empty slot or a
padding token, so masks are computed from positions alone and padding never needs a
separate mask.

Tokens are addressed by *column*: the index in the (left-padded) stream of tokens fed to the
model, the same for every row of the batch. Column c lives in slot c % slots. Global layers get
as many slots as columns, so nothing is overwritten; sliding-window layers of Gemma 2 keep
only `sliding_window_size` slots (a ring buffer): a key that old is outside every later query's
window anyway.
"""

from __future__ import annotations

from keras import ops

from gemma_keras.backend_ops import write_slot
from gemma_keras.distribution import shard_cache


def cache_slots(config, total_columns: int, ring: bool = True) -> dict:
    """Slots per attention kind for a cache that must hold `total_columns` columns.

    ring=False gives sliding-window layers a slot per column too. Exported models use that:
    there a chunk is written into the cache *before* it is attended over (one code path for
    prefill and decode, with shapes fixed at export), which a ring would corrupt when the
    chunk overwrites keys its own earlier queries still see.
    """
    kinds = {"global": total_columns}
    if config.use_sliding_window_attention:
        kinds["local"] = min(total_columns, config.sliding_window_size) if ring else total_columns
    return kinds


def layer_kind(config, layer_index: int) -> str:
    return "local" if config.is_sliding_layer(layer_index) else "global"


def init_cache(config, batch: int, total_columns: int, dtype, ring: bool = True) -> dict:
    """An empty cache (every slot at position -1) for `total_columns` columns."""
    cache = {}
    for kind, slots in cache_slots(config, total_columns, ring).items():
        n_layers = sum(layer_kind(config, i) == kind for i in range(config.num_layers))
        shape = (batch, slots, config.num_key_value_heads, config.head_dim)
        cache[kind] = {
            "positions": ops.full((batch, slots), -1, dtype="int32"),
            "kv": [(ops.zeros(shape, dtype), ops.zeros(shape, dtype)) for _ in range(n_layers)],
        }
    # Under a keras.distribution (JAX) the cache is born split by batch / kv heads, so no
    # device ever holds it whole and the first prefill compiles for the split layout.
    return shard_cache(cache)


def write(buffer, update, start):
    """Writes `update` ([batch, length, ...]) at columns start.. of a ring `buffer`
    ([batch, slots, ...]); returns the new buffer. This is the only function that changes a
    cache.

    One column (decoding) is a single dynamic slice update. A chunk (prefill, a new chat turn)
    may wrap around the ring or be longer than it: each slot then takes the last column of the
    chunk that maps to it, by a gather, keeping static shapes for the compilers.
    """
    # Static sizes where known; graph sizes where not (an exported model's prompt length).
    slots = buffer.shape[1] or ops.shape(buffer)[1]
    length = update.shape[1] or ops.shape(update)[1]
    start = ops.cast(start, "int32")
    if update.shape[1] == 1:
        return write_slot(buffer, update, start % slots)
    slot = ops.arange(slots, dtype="int32")
    last = start + length - 1
    # The latest column of this chunk that lands in each slot, and whether there is one.
    column = last - (last - slot) % slots  # [slots]
    written = column >= start
    source = ops.clip(column - start, 0, length - 1)
    gathered = ops.take(update, source, axis=1)  # [batch, slots, ...]
    shape = [1, slots] + [1] * (len(buffer.shape) - 2)
    return ops.where(ops.reshape(written, shape), ops.cast(gathered, buffer.dtype), buffer)
