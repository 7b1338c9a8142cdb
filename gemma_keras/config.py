"""GemmaConfig: one frozen description for every Gemma variant (Gemma 1, 1.1, CodeGemma, Gemma 2,
Gemma 3's text model).

Variants differ only in these fields; no code path forks on "is this Gemma 2". Field names are
keras-hub's `GemmaBackbone` arguments so a keras-hub `config.json` maps onto it one to one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from gemma_keras.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    vocabulary_size: int
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    hidden_dim: int
    # Width of both GeGLU branches together, as keras-hub and the Gemma paper count it:
    # each of the gate and up projections is `intermediate_dim // 2` wide.
    intermediate_dim: int
    head_dim: int
    # True: queries scaled by head_dim ** -0.5. False: by (hidden_dim / num_query_heads) ** -0.5,
    # which is what Gemma 2 27B was trained with (4608 / 32 = 144 -> 1/12, head_dim is 128).
    query_head_dim_normalize: bool = True
    use_post_ffw_norm: bool = False
    use_post_attention_norm: bool = False
    attention_logit_soft_cap: Optional[float] = None
    final_logit_soft_cap: Optional[float] = None
    # When on, layer i attends globally when (i + 1) % sliding_window_pattern == 0 and to a
    # sliding window otherwise: Gemma 2 alternates (pattern 2: layers 0, 2, 4, ... local),
    # Gemma 3 has five local layers to one global (pattern 6).
    use_sliding_window_attention: bool = False
    sliding_window_size: int = 4096
    layer_norm_epsilon: float = 1e-6
    dropout: float = 0.0
    # RoPE base of the global layers (and of every layer when local_rope_max_wavelength is
    # None): 10,000 for Gemma 1 and 2; Gemma 3 uses 1,000,000 globally and 10,000 locally.
    rope_max_wavelength: float = 10_000.0
    max_sequence_length: int = 8192
    # Gemma 3: an RMSNorm ((1 + w) scale, over head_dim) on every query and key head, before
    # RoPE. keras-hub's Gemma3Backbone argument name.
    use_query_key_norm: bool = False
    sliding_window_pattern: int = 2
    local_rope_max_wavelength: Optional[float] = None
    # Linear RoPE position scaling (positions divided by the factor) per attention kind:
    # Gemma 3 4B/12B/27B stretch their global layers x8 to 128k. keras-hub's names.
    global_rope_scaling_factor: float = 1.0
    local_rope_scaling_factor: float = 1.0
    # Queries scaled by query_pre_attn_scalar ** -0.5 when set, overriding
    # query_head_dim_normalize. Set only for a scalar that is neither head_dim nor
    # hidden_dim / num_query_heads (transformers' configs can say any); None for every
    # released Gemma, so the two spellings of one model compare equal.
    query_pre_attn_scalar: Optional[float] = None

    def __post_init__(self):
        for name in ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
                     "hidden_dim", "intermediate_dim", "head_dim", "sliding_window_size",
                     "max_sequence_length", "sliding_window_pattern"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GemmaConfig.{name} must be a positive integer, got {value!r}.")
            # A config from a file is untrusted: a size far past any model (the largest Gemma
            # has 46 layers and 256,128 embeddings) is refused before a loop or buffer uses it.
            limit = 4096 if name == "num_layers" else 1 << 24
            if value > limit:
                raise ConfigError(f"GemmaConfig.{name} is {value}, beyond the {limit} this "
                                  "library accepts (no Gemma is near it): a corrupt config?")
        if self.num_query_heads % self.num_key_value_heads:
            raise ConfigError(
                f"GemmaConfig.num_query_heads ({self.num_query_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}).")
        if self.intermediate_dim % 2:
            raise ConfigError(
                f"GemmaConfig.intermediate_dim ({self.intermediate_dim}) counts both GeGLU "
                "branches together and must be even.")
        if self.head_dim % 2:
            raise ConfigError(f"GemmaConfig.head_dim ({self.head_dim}) must be even for RoPE.")
        for name in ("attention_logit_soft_cap", "final_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"GemmaConfig.{name} must be positive or None, got {value!r}.")
        for name in ("rope_max_wavelength", "local_rope_max_wavelength",
                     "global_rope_scaling_factor", "local_rope_scaling_factor",
                     "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is None and name in ("local_rope_max_wavelength", "query_pre_attn_scalar"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or value == float("inf"):
                raise ConfigError(f"GemmaConfig.{name} must be a positive number, got {value!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GemmaConfig.dropout must be in [0, 1), got {self.dropout!r}.")

    # ---- derived quantities: each written here once -------------------------------------
    @property
    def query_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        if self.query_head_dim_normalize:
            return self.head_dim ** -0.5
        # keras-hub and the reference JAX code use integer division here.
        return (self.hidden_dim // self.num_query_heads) ** -0.5

    @property
    def ffn_branch_dim(self) -> int:
        return self.intermediate_dim // 2

    def attention_kind(self, layer_index: int) -> str:
        """"local" for a sliding-window layer (Gemma 2: every other layer, from layer 0;
        Gemma 3: all but every sixth), "global" for full causal attention. Masks, RoPE tables
        and the KV cache are built per kind."""
        if (self.use_sliding_window_attention
                and (layer_index + 1) % self.sliding_window_pattern != 0):
            return "local"
        return "global"

    @property
    def attention_kinds(self) -> tuple:
        """The kinds this config's layers use, in a fixed order ("global" first: the cache's
        capacity is read from it, so a config whose layers are all local still has it)."""
        return ("global", "local") if self.use_sliding_window_attention else ("global",)

    @property
    def rope_varies_by_kind(self) -> bool:
        """Whether local and global layers rotate differently (Gemma 3): a local base of their
        own or linear scaling on either kind. Gemma 1 and 2 checkpoint classes cannot say so."""
        return (self.local_rope_max_wavelength is not None
                or self.global_rope_scaling_factor != 1.0
                or self.local_rope_scaling_factor != 1.0)

    def rope(self, kind: str) -> tuple:
        """(max wavelength, linear position scaling factor) of RoPE on `kind`'s layers."""
        if kind == "local":
            wavelength = self.local_rope_max_wavelength or self.rope_max_wavelength
            return float(wavelength), float(self.local_rope_scaling_factor)
        return float(self.rope_max_wavelength), float(self.global_rope_scaling_factor)

    def attention_window(self, kind: str):
        """How many positions back a query of this kind sees (itself included); None: all."""
        return self.sliding_window_size if kind == "local" else None

    def parameter_count(self) -> int:
        """Exact count of the weights the backbone allocates, without allocating them."""
        h, d = self.hidden_dim, self.head_dim
        attention = h * d * (2 * self.num_query_heads + 2 * self.num_key_value_heads)
        ffn = 3 * h * self.ffn_branch_dim
        norms = h * (2 + int(self.use_post_attention_norm) + int(self.use_post_ffw_norm))
        norms += 2 * d * int(self.use_query_key_norm)
        per_layer = attention + ffn + norms
        return self.vocabulary_size * h + self.num_layers * per_layer + h

    # ---- serialisation ------------------------------------------------------------------
    # Fields keras-hub's GemmaBackbone does not take: it fixes them at Gemma's values.
    GEMMA_KERAS_ONLY = ("rope_max_wavelength", "max_sequence_length", "use_query_key_norm",
                        "sliding_window_pattern", "local_rope_max_wavelength",
                        "global_rope_scaling_factor", "local_rope_scaling_factor",
                        "query_pre_attn_scalar")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_keras_hub(self) -> dict[str, Any]:
        """The `config` dict of keras-hub's GemmaBackbone (no gemma_keras-only fields)."""
        out = self.to_dict()
        for extra in self.GEMMA_KERAS_ONLY:
            out.pop(extra)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "GemmaConfig":
        """Build from a keras-hub-style dict; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys keras serialisation adds that do not describe the architecture.
        ignored = {"name", "trainable", "dtype"}
        unknown = sorted(set(values) - known - ignored)
        if unknown:
            raise ConfigError(f"{source}: unknown GemmaBackbone argument(s) {unknown}.")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in values)
        if missing:
            raise ConfigError(f"{source}: missing required GemmaBackbone argument(s) {missing}.")
        kwargs = {k: v for k, v in values.items() if k in known}
        try:
            for cap in ("attention_logit_soft_cap", "final_logit_soft_cap"):
                if kwargs.get(cap) is not None:
                    kwargs[cap] = float(kwargs[cap])
            return cls(**kwargs)
        except (ConfigError, TypeError, ValueError) as e:  # a value of the wrong kind
            raise ConfigError(f"{source}: {e}") from None

    def replace(self, **changes) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        kind = "MQA" if self.num_key_value_heads == 1 else (
            "MHA" if self.num_key_value_heads == self.num_query_heads else "GQA")
        return (f"{self.num_layers} layers, hidden {self.hidden_dim}, {self.num_query_heads}/"
                f"{self.num_key_value_heads} heads ({kind}), {self.parameter_count():,} params")

