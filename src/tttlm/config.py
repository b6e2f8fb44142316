"""Typed model configuration for TTT-E2E and its baselines.

One dataclass describes every model tttlm builds. Derived values are computed in
``__post_init__``; bad values raise ``ValueError`` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

# Largest η accepted: the official η is 1 (with the inner gradient clipped to norm 1); values
# far above it only make the fast weights explode (NaN losses), and 1e30 is a typo, not a
# setting.
MAX_INNER_LR = 1000.0


def check_number(name: str, value: Any, *, minimum: float | None = None,
                 strict: bool = False, maximum: float | None = None, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number (not a bool) in range:
    ``> minimum`` with ``strict``, else ``>= minimum``, and ``<= maximum``."""
    fix = f"; {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number{fix}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number (not NaN or infinity){fix}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name}={value!r} must be {relation} {minimum:g}{fix}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r} is too large: at most {maximum:g}{fix}")


class Variant(str, enum.Enum):
    """Which network a config describes."""

    E2E = "e2e"  # sliding window + prime MLPs in the suffix blocks, trained by meta-learning
    SWA = "swa"  # the same Transformer with sliding-window attention, no prime MLPs
    FULL = "full"  # causal full attention, no prime MLPs
    # the paper's hybrid baseline: sliding-window layers with a full-attention layer in every
    # `global_every` (5:1 at the default 6), no prime MLPs
    HYBRID = "hybrid"
    # TTT-KVB (key-value binding, the layer TTT-E2E derives from) in the hybrid's place of
    # full attention: SWA blocks with a TTT-KVB block in every `global_every`
    TTT_KVB = "ttt_kvb"
    # Gated DeltaNet (Yang et al. 2024, through flash-linear-attention) in the same place
    GATED_DELTANET = "gated_deltanet"
    # Mamba 2's state-space duality layer in the same place
    MAMBA2 = "mamba2"


# Variants that mix SWA blocks with another kind of block, one in every `global_every`.
MIXED = (Variant.HYBRID, Variant.TTT_KVB, Variant.GATED_DELTANET, Variant.MAMBA2)
# Variants whose mixed-in blocks replace attention by a recurrent token mixer.
RECURRENT = {Variant.TTT_KVB: "ttt_kvb", Variant.GATED_DELTANET: "gated_deltanet",
             Variant.MAMBA2: "mamba2"}

# name: (layers, hidden, heads, MLP width of the full-attention/SWA models, MLP width of E2E)
_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (4, 64, 4, 128, 128),
    "125m": (12, 768, 12, 2048, 1664),
    "350m": (24, 1024, 16, 2816, 2304),
    "760m": (24, 1536, 16, 4096, 3328),
    "1b": (24, 2048, 32, 5376, 4352),
    "3b": (32, 2560, 32, 6912, 5632),
}

# The official TTT-E2E settings (Llama-3 tokenizer): every size preset but `tiny` (scaled to run
# on a CPU) uses them, and `tttlm convert official` assumes them for what a checkpoint does not
# record. Defined here only.
OFFICIAL_VOCAB_SIZE = 128256
OFFICIAL_WINDOW = 8192
OFFICIAL_CHUNK_SIZE = 1024
OFFICIAL_ROPE_THETA = 500000.0
OFFICIAL_BOS_ID = 128000  # Llama-3's <|begin_of_text|>
OFFICIAL_EOS_ID = 128001  # Llama-3's <|end_of_text|>
_OFFICIAL = dict(vocab_size=OFFICIAL_VOCAB_SIZE, window=OFFICIAL_WINDOW,
                 chunk_size=OFFICIAL_CHUNK_SIZE, rope_theta=OFFICIAL_ROPE_THETA,
                 bos_token_id=OFFICIAL_BOS_ID, eos_token_id=OFFICIAL_EOS_ID)
# `tiny` is the configuration of the official-code fixture (two TTT blocks of four).
_TINY = dict(vocab_size=256, window=64, chunk_size=32, rope_theta=10000.0,
             bos_token_id=1, eos_token_id=2, num_ttt_layers=2)

PRESETS: tuple[str, ...] = tuple(_SIZES)

ROPE_LAYOUTS: tuple[str, ...] = ("interleaved", "half")
# The RoPE scalings tttlm computes as transformers does, with the keys each one needs.
ROPE_SCALINGS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}
# Architecture fields added for pretrained imports, at their (official) defaults as to_dict
# writes them: left out of the fingerprint there, so older models keep theirs.
_ARCHITECTURE_DEFAULTS: dict[str, Any] = dict(
    num_kv_heads=None, head_dim=None, qk_norm=True, post_norms=True, rope_layout="interleaved",
    rope_freq_scaling=None, tie_embeddings=True, qkv_bias=False, attn_out_bias=False,
    mlp_bias=False, global_every=6, kvb_fast="linear")


def _check_rope_freq_scaling(scaling: Any) -> None:
    if scaling is None:
        return
    fix = f"use null or one of {sorted(ROPE_SCALINGS)} with its keys"
    if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_SCALINGS:
        raise ValueError(f"rope_freq_scaling={scaling!r} is not supported; {fix}")
    for key in ROPE_SCALINGS[scaling["rope_type"]]:
        check_number(f"rope_freq_scaling[{key!r}]", scaling.get(key), minimum=0, strict=True,
                     hint=fix)
    if scaling["rope_type"] == "llama3" and (
            scaling["high_freq_factor"] <= scaling["low_freq_factor"]):
        raise ValueError("rope_freq_scaling: high_freq_factor must exceed low_freq_factor (4 and 1 "
                         "in Llama 3.1)")


@dataclass
class TTTConfig:
    """Configuration of a TTT-E2E model (or of its `swa`/`full` baselines).

    Attributes:
        vocab_size: number of token ids.
        hidden_size: model width D.
        num_layers: number of Transformer blocks L.
        num_heads: attention (query) heads.
        num_kv_heads: key/value heads (grouped-query attention); must divide ``num_heads``.
            ``None``: ``num_heads`` (the official multi-head attention).
        head_dim: width of one head; ``None``: ``hidden_size // num_heads`` (official).
        intermediate_size: width of every block's SwiGLU MLP.
        variant: ``e2e``, ``swa``, ``full``, ``hybrid``, ``ttt_kvb``, ``gated_deltanet`` or
            ``mamba2`` (see :class:`Variant`).
        num_ttt_layers: S, the number of last blocks that carry a prime MLP updated at test time
            (``e2e`` only; the official choice is ``num_layers // 4``).
        prime_intermediate_size: width of the prime MLPs (defaults to ``intermediate_size``).
        window: sliding-window size k: a token attends to the k tokens ending at itself
            (``swa``, ``e2e`` and the windowed layers of ``hybrid``; ignored by ``full``).
        global_every: ``hybrid``, ``ttt_kvb``, ``gated_deltanet``, ``mamba2``: one block in
            every ``global_every`` has full attention (``hybrid``) or a TTT-KVB / Gated
            DeltaNet / Mamba 2 layer instead of attention, the
            last of each group (blocks ``global_every - 1``, ``2 * global_every - 1``, …; 5:1
            at 6, the paper's hybrid ratio); the others slide over ``window``.
        kvb_fast: ``ttt_kvb`` only: the fast weights of its TTT-KVB blocks, ``linear``
            (``x W + b``, TTT-Linear) or ``mlp`` (a GELU MLP 4x the head width, TTT-MLP).
        chunk_size: b, the tokens per test-time-training mini-batch; the inner step runs after
            every full chunk. ``swa``/``full`` use it only to bound memory of the loss.
        rope_theta: RoPE base θ.
        rope_layout: ``interleaved`` (pairs ``(x[2i], x[2i+1])``, the official code) or
            ``half`` (pairs ``(x[i], x[i+d/2])``, transformers' Llama ``rotate_half``).
        rope_freq_scaling: ``None`` or transformers' RoPE scaling of the inverse frequencies
            (named apart from transformers' ``rope_scaling``, which its configs rewrite):
            ``{"rope_type": "linear", "factor": f}`` or ``{"rope_type": "llama3", "factor",
            "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``.
        qk_norm: RMSNorm of every query and key head before RoPE (official; Qwen3 too).
        post_norms: RMSNorm of every branch output before the residual add ("sandwich",
            official); ``False``: pre-norms only (Llama, Qwen).
        tie_embeddings: the output head is the embedding matrix (official); ``False``: a
            separate ``lm_head``.
        qkv_bias: biases on the query/key/value projections (Qwen2).
        attn_out_bias: a bias on the attention output projection (Llama ``attention_bias``).
        mlp_bias: biases on the MLP's three projections (Llama ``mlp_bias``); the prime MLPs
            never have biases (their fast weights are the three matrices).
        rms_norm_eps: epsilon inside the RMSNorm square root.
        initializer_range: standard deviation of the normal init of every matrix.
        inner_lr: η, the learning rate of the inner SGD step on the fast weights.
        inner_clip: the inner gradient of each sequence is clipped to this global L2 norm
            (over all prime MLPs together); ``0`` disables clipping.
        inner_lr_init: η at the first outer step of inner-LR warmup.
        inner_lr_warmup_steps: outer steps over which η ramps linearly from ``inner_lr_init``
            to ``inner_lr`` (0: no warmup; the official pretraining uses 10% of steps).
        inner_optimizer: the test-time optimizer of the fast weights, a name in
            ``tttlm.ttt.optim.INNER_OPTIMIZERS``: ``sgd`` (the official clipped SGD),
            ``momentum`` (heavy ball on the clipped gradient), ``learned_lr`` (a meta-learned
            per-layer scale of η).
        inner_momentum: β of the ``momentum`` inner optimizer.
        bos_token_id: id joining documents; a target equal to it is not counted in the loss.
        eos_token_id: end-of-text id used to stop generation.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    variant: Variant = Variant.E2E
    num_ttt_layers: int | None = None
    prime_intermediate_size: int | None = None
    window: int = 64
    chunk_size: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    inner_lr: float = 1.0
    inner_clip: float = 1.0
    inner_lr_init: float = 0.1
    inner_lr_warmup_steps: int = 0
    inner_optimizer: str = "sgd"
    inner_momentum: float = 0.9
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Architecture options of the Llama family (issue 15); the defaults are the official
    # layout, and at their defaults they leave the fingerprint of older models unchanged.
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool = True
    post_norms: bool = True
    rope_layout: str = "interleaved"
    rope_freq_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = True
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    global_every: int = 6
    kvb_fast: str = "linear"

    def __post_init__(self) -> None:
        try:
            self.variant = Variant(self.variant)
        except ValueError:
            raise ValueError(
                f"variant={self.variant!r} is not known; use one of "
                f"{', '.join(v.value for v in Variant)}") from None
        if self.variant is Variant.E2E:
            if self.num_ttt_layers is None:
                self.num_ttt_layers = max(1, self.num_layers // 4)
            if self.prime_intermediate_size is None:
                self.prime_intermediate_size = self.intermediate_size
        else:
            # Baselines have no prime MLPs; keep the fields empty so they cannot mislead.
            self.num_ttt_layers = 0
            self.prime_intermediate_size = None
        # Resolved here so that every reader sees integers; to_dict writes None back for the
        # derived values, so that a config.json keeps following hidden_size / num_heads.
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and isinstance(self.num_heads, int) and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        self._validate()

    def _validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "window", "chunk_size"):
            positive(name)
        positive("num_kv_heads")
        positive("head_dim")
        derived = self.head_dim == self.hidden_size // self.num_heads
        if self.hidden_size % self.num_heads and derived:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                "pick a head count that divides the width (or set head_dim)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}; "
                "each key/value head serves the same number of query heads")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} must be even for RoPE; change head_dim (or "
                "hidden_size or num_heads)")
        for name in ("qk_norm", "post_norms", "tie_embeddings", "qkv_bias", "attn_out_bias",
                     "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout={self.rope_layout!r} is not known; use one of "
                             f"{', '.join(ROPE_LAYOUTS)}")
        _check_rope_freq_scaling(self.rope_freq_scaling)
        if self.variant is Variant.E2E:
            positive("prime_intermediate_size")
            if not isinstance(self.num_ttt_layers, int) or not (
                    1 <= self.num_ttt_layers <= self.num_layers):
                raise ValueError(
                    f"num_ttt_layers={self.num_ttt_layers!r} must be between 1 and "
                    f"num_layers={self.num_layers}; the official choice is num_layers // 4")
        if not isinstance(self.global_every, int) or isinstance(self.global_every, bool) or (
                self.global_every < 2):
            raise ValueError(f"global_every={self.global_every!r} must be an integer >= 2 (one "
                             "full-attention block in every global_every; 6 gives SWA:full 5:1)")
        if self.kvb_fast not in ("linear", "mlp"):
            raise ValueError(f"kvb_fast={self.kvb_fast!r} is not known; use linear or mlp")
        if self.variant in MIXED and self.global_every > self.num_layers:
            raise ValueError(f"global_every={self.global_every} exceeds num_layers="
                             f"{self.num_layers}: the {self.variant.value} model would have no "
                             "full-attention or TTT-KVB block; "
                             "lower global_every")
        if self.variant is not Variant.FULL and self.window < self.chunk_size:
            raise ValueError(
                f"window={self.window} is smaller than chunk_size={self.chunk_size}: a chunk "
                "must fit in the attention window; raise window or lower chunk_size")
        check_number("rope_theta", self.rope_theta, minimum=0, strict=True,
                     hint="the RoPE base θ is positive (10000 or 500000 in the presets)")
        check_number("rms_norm_eps", self.rms_norm_eps, minimum=0, strict=True,
                     hint="use a small positive epsilon such as 1e-6")
        check_number("initializer_range", self.initializer_range, minimum=0,
                     hint="the init standard deviation is 0.02 in the presets")
        for name in ("inner_lr", "inner_lr_init"):
            check_number(name, getattr(self, name), minimum=0, maximum=MAX_INNER_LR,
                         hint="inner learning rates are >= 0 (0 turns test-time training into a "
                              f"no-op) and at most {MAX_INNER_LR:g}; the official η is 1")
        check_number("inner_clip", self.inner_clip, minimum=0,
                     hint="the inner gradient norm clip is >= 0 (0 disables clipping)")
        if not isinstance(self.inner_lr_warmup_steps, int) or isinstance(
                self.inner_lr_warmup_steps, bool) or self.inner_lr_warmup_steps < 0:
            raise ValueError(f"inner_lr_warmup_steps={self.inner_lr_warmup_steps!r} must be an "
                             "integer >= 0")
        if not isinstance(self.inner_optimizer, str) or not self.inner_optimizer:
            # The names are checked against the registry when the model is built (tttlm.ttt
            # imports torch; the config stays light).
            raise ValueError(f"inner_optimizer={self.inner_optimizer!r} must be the name of an "
                             "inner optimizer (sgd, momentum, learned_lr)")
        check_number("inner_momentum", self.inner_momentum, minimum=0, maximum=0.999,
                     hint="the momentum β is in [0, 1): 0.9 is usual")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an integer token id")
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # ----------------------------------------------------------------------------- derived
    @property
    def num_prefix_layers(self) -> int:
        """Blocks before the TTT blocks (all blocks for the baselines)."""
        return self.num_layers - (self.num_ttt_layers or 0)

    @property
    def uses_window(self) -> bool:
        """Some block slides over ``window`` (all of them but ``full``'s)."""
        return self.variant is not Variant.FULL

    def layer_window(self, index: int) -> int | None:
        """The attention window of block ``index``; ``None``: full causal attention (a
        TTT-KVB block, which has no attention, reports the window)."""
        if self.variant is Variant.FULL:
            return None
        if self.variant is Variant.HYBRID and (index + 1) % self.global_every == 0:
            return None
        return self.window

    def layer_mixer(self, index: int) -> str:
        """How block ``index`` mixes tokens: ``attention``, ``ttt_kvb``, ``gated_deltanet`` or
        ``mamba2``."""
        if self.variant in RECURRENT and (index + 1) % self.global_every == 0:
            return RECURRENT[self.variant]
        return "attention"

    def is_recurrent_layer(self, index: int) -> bool:
        """Whether block ``index`` mixes tokens with a recurrent layer (a state of fixed size
        instead of a key/value cache)."""
        return self.layer_mixer(index) != "attention"

    @property
    def full_attention_layers(self) -> list[int]:
        """Blocks with full attention (whose decoding caches grow with the context)."""
        return [i for i in range(self.num_layers) if self.layer_window(i) is None]

    def inner_lr_at(self, step: int) -> float:
        """η at outer step ``step`` (0-based): ``init + (lr - init) * min(1, (step+1)/warmup)``."""
        if self.inner_lr_warmup_steps <= 0:
            return self.inner_lr
        frac = min(1.0, (step + 1) / self.inner_lr_warmup_steps)
        return self.inner_lr_init + (self.inner_lr - self.inner_lr_init) * frac

    # ------------------------------------------------------------------------ constructors
    @classmethod
    def from_preset(cls, name: str, variant: Variant | str = Variant.E2E,
                    **overrides: Any) -> TTTConfig:
        """Build ``tiny`` or an official size (``125m 350m 760m 1b 3b``) in a given variant.

        ``e2e`` uses the reduced MLP width of the official TTT-E2E presets, ``swa`` and
        ``full`` the full width, so the three variants have about the same parameter count.
        """
        if name not in _SIZES:
            raise ValueError(f"preset {name!r} is not known; use one of {', '.join(PRESETS)}")
        variant = Variant(variant)
        layers, hidden, heads, ffn_full, ffn_e2e = _SIZES[name]
        fields: dict[str, Any] = dict(_TINY if name == "tiny" else _OFFICIAL)
        fields.update(num_layers=layers, hidden_size=hidden, num_heads=heads, variant=variant,
                      intermediate_size=ffn_e2e if variant is Variant.E2E else ffn_full)
        if variant is not Variant.E2E:
            fields.pop("num_ttt_layers", None)
        if variant in MIXED and layers < 6:
            fields["global_every"] = 2  # tiny: 4 blocks, so 1:1 (blocks 1 and 3 full)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["variant"] = self.variant.value
        if self.num_kv_heads == self.num_heads:
            data["num_kv_heads"] = None
        if self.head_dim == self.hidden_size // self.num_heads:
            data["head_dim"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TTTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type", "tttlm_version"})
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps({"model_type": "tttlm", **self.to_dict()}, indent=2, sort_keys=True)

    def fingerprint(self) -> str:
        """A short hash of every field that changes the network's function."""
        data = self.to_dict()
        for key in ("inner_lr_init", "inner_lr_warmup_steps", "initializer_range"):
            data.pop(key)
        # Fields added after the first release count only when they change something, so that
        # models saved before them keep their fingerprint.
        if data["inner_optimizer"] == "sgd":
            data.pop("inner_optimizer")
        if self.inner_optimizer != "momentum":
            data.pop("inner_momentum")
        for key, default in _ARCHITECTURE_DEFAULTS.items():
            if data[key] == default:
                data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
