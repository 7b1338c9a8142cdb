"""The key/value cache: explicit data passed into the model and returned updated. Everything
about it is here: layout, initialisation, the one write function, what each attention layer
attends over, sharding, and the per-layer form exports use.

Layout: a dict with one entry per attention kind the config uses (`config.attention_kinds`),
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

A forward pass with a cache is one `Mode` (see there). The backbone opens a `CacheUpdate` for
the pass, hands each attention layer its `LayerCache` view, and returns the updated cache;
layers never see the layout.
"""

from __future__ import annotations

import enum

from keras import ops

from gemma_keras import backends
from gemma_keras.errors import InvalidArgumentError


class Mode(enum.Enum):
    """How a chunk of new tokens uses the cache."""
    PREFILL = "prefill"  # the cache is empty: the chunk attends over itself
    DECODE = "decode"    # the chunk is written first, then attends over the whole cache: one
    #                      new token; an export's chunks (its cache has no ring); speculative
    #                      passes of L <= lookahead + 1 columns (a ring of window + lookahead
    #                      slots loses only keys older than every query's window)
    EXTEND = "extend"    # a chunk after earlier tokens: attends over the old cache + itself


def cache_slots(config, total_columns: int, ring: bool = True, lookahead: int = 0) -> dict:
    """Slots per attention kind for a cache that must hold `total_columns` columns.

    ring=False gives sliding-window layers a slot per column too. Exported models use that:
    there a chunk is written into the cache *before* it is attended over (one code path for
    prefill and decode, with shapes fixed at export), which a ring would corrupt when the
    chunk overwrites keys its own earlier queries still see.

    lookahead: columns a pass may write beyond what is then kept (speculative decoding
    writes drafts, then `truncate`s the rejected ones). A ring of window + lookahead slots
    never overwrites a key a later query still needs, however many of them are rejected.
    """
    window = config.attention_window("local")
    return {kind: min(total_columns, window + lookahead) if kind == "local" and ring
            else total_columns for kind in config.attention_kinds}


def _layer_places(config):
    """[(kind, index among that kind's layers)] in layer order."""
    places, counts = [], {}
    for i in range(config.num_layers):
        kind = config.attention_kind(i)
        places.append((kind, counts.get(kind, 0)))
        counts[kind] = counts.get(kind, 0) + 1
    return places


def init_cache(config, batch: int, total_columns: int, dtype, ring: bool = True,
               lookahead: int = 0) -> dict:
    """An empty cache (every slot at position -1) for `total_columns` columns (`lookahead`:
    see `cache_slots`)."""
    kinds = [kind for kind, _ in _layer_places(config)]
    cache = {}
    for kind, slots in cache_slots(config, total_columns, ring, lookahead).items():
        shape = (batch, slots, config.num_key_value_heads, config.head_dim)
        cache[kind] = {
            "positions": ops.full((batch, slots), -1, dtype="int32"),
            "kv": [(ops.zeros(shape, dtype), ops.zeros(shape, dtype))
                   for _ in range(kinds.count(kind))],
        }
    # Under a keras.distribution (JAX) the cache is born split by batch / kv heads, so no
    # device ever holds it whole and the first prefill compiles for the split layout.
    return backends.get().shard_cache(cache)


def capacity(cache):
    """Columns the cache holds (the global layers' slots): a static int where known."""
    positions = cache["global"]["positions"]
    return positions.shape[1] or ops.shape(positions)[1]


def write(buffer, update, start):
    """Writes `update` ([batch, length, ...]) at columns start.. of a ring `buffer`
    ([batch, slots, ...]); returns the new buffer. This is the only function that writes a
    cache (`truncate` only forgets positions).

    `start` is one column for every row (a scalar), or one per row ([batch]: rows of a
    speculative batch advance by the drafts each accepted). One column at a shared start
    (decoding) is a single dynamic slice update. A chunk (prefill, a new chat turn, drafts
    to verify) may wrap around the ring or be longer than it: each slot then takes the last
    column of the chunk that maps to it, by a gather, keeping static shapes for the
    compilers.
    """
    # Static sizes where known; graph sizes where not (an exported model's prompt length).
    slots = buffer.shape[1] or ops.shape(buffer)[1]
    length = update.shape[1] or ops.shape(update)[1]
    start = ops.cast(start, "int32")
    per_row = len(start.shape) == 1
    if update.shape[1] == 1 and not per_row:
        return backends.get().write_slot(buffer, update, start % slots)
    if per_row and isinstance(length, int) and isinstance(slots, int) and length <= slots:
        # A speculative pass's few columns per row: a scatter of batch x length entries.
        # The gather below rewrites every slot of the buffer, which made a verify pass of 9
        # columns cost 3 one-token steps on the demo preset (JAX, CPU).
        batch = ops.shape(update)[0]
        columns = start[:, None] + ops.arange(length, dtype="int32")[None, :]  # [batch, len]
        rows = ops.broadcast_to(ops.arange(batch, dtype="int32")[:, None], (batch, length))
        indices = ops.reshape(ops.stack([rows, columns % slots], axis=-1), (-1, 2))
        entries = ops.reshape(update, [-1] + list(update.shape[2:]))  # [batch * len, ...]
        return ops.scatter_update(buffer, indices, ops.cast(entries, buffer.dtype))
    if per_row:
        start = start[:, None]  # [batch, 1]
    slot = ops.arange(slots, dtype="int32")
    last = start + length - 1
    # The latest column of this chunk that lands in each slot, and whether there is one:
    # [slots], or [batch, slots] with a start per row.
    column = last - (last - slot) % slots
    written = column >= start
    source = ops.clip(column - start, 0, length - 1)
    trailing = [1] * (len(buffer.shape) - 2)
    if per_row:
        index = ops.broadcast_to(ops.reshape(source, list(ops.shape(source)) + trailing),
                                 ops.shape(buffer))
        gathered = ops.take_along_axis(update, index, axis=1)  # [batch, slots, ...]
        shape = list(ops.shape(written)) + trailing
    else:
        gathered = ops.take(update, source, axis=1)  # [batch, slots, ...]
        shape = [1, slots] + trailing
    return ops.where(ops.reshape(written, shape), ops.cast(gathered, buffer.dtype), buffer)


def truncate(cache, last_position):
    """The cache with every token after `last_position` ([batch], per row) forgotten: its
    slot's position becomes -1, so no mask ever shows it again. This is how speculative
    decoding rolls back rejected drafts; it works the same on rings, because a ring keeps
    `lookahead` slots more than its window (see `cache_slots`)."""
    keep = ops.cast(last_position, "int32")[:, None]  # [batch, 1]
    return {kind: {"positions": ops.where(part["positions"] > keep, -1, part["positions"]),
                   "kv": part["kv"]}
            for kind, part in cache.items()}


class LayerCache:
    """One attention layer's view of the cache for one forward pass."""

    def __init__(self, key, value, start, mode: Mode):
        self.key, self.value, self.start, self.mode = key, value, start, mode

    def update(self, key, value):
        """key, value: this pass's [batch, len, kv_heads, head_dim]. Returns ((keys, values)
        to attend over, the layer's updated (key, value) buffers)."""
        written = (write(self.key, key, self.start), write(self.value, value, self.start))
        if self.mode is Mode.DECODE:
            return written, written
        if self.mode is Mode.EXTEND:
            # [batch, slots + len, kv_heads, head_dim]
            return ((ops.concatenate([self.key, ops.cast(key, self.key.dtype)], axis=1),
                     ops.concatenate([self.value, ops.cast(value, self.value.dtype)], axis=1)),
                    written)
        return (key, value), written


class CacheUpdate:
    """One forward pass over `cache` with new tokens at `positions` ([batch, len]) written at
    columns start..: the key positions each attention kind sees, each layer's view, and the
    updated cache once every layer has stored its buffers."""

    def __init__(self, config, cache, positions, start, mode):
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise InvalidArgumentError(
                f"mode={mode!r}: a forward pass with a cache is one of "
                f"{[m.value for m in Mode]} (gemma_keras.layers.kv_cache.Mode).") from None
        self.start, self._places = start, _layer_places(config)
        self._cache = cache
        self._new = {}
        self.key_positions = {}  # kind -> [batch, keys]
        for kind, part in cache.items():
            updated = write(part["positions"], positions, start)
            self._new[kind] = {"positions": updated, "kv": [None] * len(part["kv"])}
            if self.mode is Mode.DECODE:
                self.key_positions[kind] = updated
            elif self.mode is Mode.EXTEND:
                self.key_positions[kind] = ops.concatenate([part["positions"], positions], 1)
            else:
                self.key_positions[kind] = positions

    def layer(self, layer_index) -> LayerCache:
        kind, j = self._places[layer_index]
        return LayerCache(*self._cache[kind]["kv"][j], self.start, self.mode)

    def store(self, layer_index, key_value):
        kind, j = self._places[layer_index]
        self._new[kind]["kv"][j] = key_value

    def result(self):
        """The updated cache. Under a keras.distribution (JAX) it leaves split by batch and kv
        heads, as it came in: the next compiled step then sees the same layout (no
        recompilation, no resharding)."""
        return backends.get().shard_cache(self._new)


def per_layer(config, cache):
    """The (key, value) buffers in layer order: the form an export names its tensors in."""
    return [cache[kind]["kv"][j] for kind, j in _layer_places(config)]


def from_per_layer(config, key_values, positions):
    """`per_layer`'s inverse: a cache from (key, value) per layer and the slots' positions
    (shared by every kind: exports keep no ring)."""
    cache = {kind: {"positions": positions, "kv": []} for kind in config.attention_kinds}
    for (kind, _), key_value in zip(_layer_places(config), key_values):
        cache[kind]["kv"].append(key_value)
    return cache


def select_rows(cache, rows):
    """The cache whose row i is row `rows[i]` of `cache` (rows: [new_batch] int32; a row may
    be chosen many times or not at all). Beam search copies a prompt's row to its beams and
    follows the beams it keeps with it, inside its compiled step."""
    def take(x):
        return ops.take(x, rows, axis=0)  # [new_batch, ...]
    return backends.get().shard_cache(
        {kind: {"positions": take(part["positions"]),
                "kv": [(take(key), take(value)) for key, value in part["kv"]]}
         for kind, part in cache.items()})
