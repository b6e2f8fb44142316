"""Map between the official TTT-E2E (JAX) parameter layout and tttlm's ``state_dict``.

The official model stores per-layer tensors stacked on a leading layer axis and every matrix as
``[in, out]`` (``y = x @ W``); the prime MLPs of the last S blocks live apart from the blocks in
``h.prime_storage`` with their own leading axis of size S. tttlm keeps one module per layer and
``nn.Linear`` matrices ``[out, in]``. Everything here is a pure reshuffle (slices and transposes),
so a round trip is bit-exact and the same table serves weights and gradients alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlm.config import (
    OFFICIAL_BOS_ID,
    OFFICIAL_CHUNK_SIZE,
    OFFICIAL_EOS_ID,
    OFFICIAL_ROPE_THETA,
    OFFICIAL_WINDOW,
    TTTConfig,
    Variant,
)
from tttlm.errors import UserError

_ROOT = "language_model.model."
_BLOCKS = _ROOT + "h.blocks."
_PRIME = _ROOT + "h.prime_storage."

WTE = _ROOT + "wte.weight"
LN_F = _ROOT + "ln_f.weight"
Q_NORM = _BLOCKS + "seq_modeling_block.q_norm.weight"
SEQ_NORM = _BLOCKS + "seq_norm.weight"
FFN_W1 = _BLOCKS + "feed_forward.w1.weight"
PRIME_W1 = _PRIME + "feed_forward_prime.w1.weight"



@dataclass(frozen=True)
class _Entry:
    """One official tensor: its tttlm name(s), per-slice official shape, and layout change."""

    official: str
    local: str  # contains "{i}" for stacked tensors
    shape: tuple[int, ...]  # official shape of one slice (one layer), [in, out] for matrices
    layers: range | None = None  # global tttlm layer index of each slice; None: not stacked
    transpose: bool = False

    @property
    def official_shape(self) -> tuple[int, ...]:
        return self.shape if self.layers is None else (len(self.layers), *self.shape)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape

    def local_names(self) -> Iterator[tuple[int | None, str]]:
        if self.layers is None:
            yield None, self.local
        else:
            for j, i in enumerate(self.layers):
                yield j, self.local.format(i=i)


def _entries(config: TTTConfig) -> list[_Entry]:
    _check_official_layout(config)
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    every = range(config.num_layers)
    table = [
        _Entry(WTE, "embed.weight", (config.vocab_size, d)),
        _Entry(LN_F, "norm.weight", (d,)),
    ]
    for official, local in (("seq_norm", "attn_norm"), ("seq_post_norm", "attn_post_norm"),
                            ("ffn_norm", "mlp_norm"), ("ffn_post_norm", "mlp_post_norm")):
        table.append(_Entry(f"{_BLOCKS}{official}.weight", f"layers.{{i}}.{local}.weight",
                            (d,), every))
    for w in ("wq", "wk", "wv", "wo"):
        table.append(_Entry(f"{_BLOCKS}seq_modeling_block.{w}.weight",
                            f"layers.{{i}}.attn.{w}.weight", (d, d), every, transpose=True))
    for n in ("q_norm", "k_norm"):
        table.append(_Entry(f"{_BLOCKS}seq_modeling_block.{n}.weight",
                            f"layers.{{i}}.attn.{n}.weight", (hd,), every))
    for w, shape in (("w1", (d, f)), ("w2", (f, d)), ("w3", (d, f))):
        table.append(_Entry(f"{_BLOCKS}feed_forward.{w}.weight", f"layers.{{i}}.mlp.{w}.weight",
                            shape, every, transpose=True))
    if config.variant is Variant.E2E:
        fp = config.prime_intermediate_size
        assert fp is not None and config.num_ttt_layers is not None
        suffix = range(config.num_layers - config.num_ttt_layers, config.num_layers)
        table.append(_Entry(f"{_PRIME}ffn_prime_norm.weight", "layers.{i}.prime_norm.weight",
                            (d,), suffix))
        table.append(_Entry(f"{_PRIME}ffn_prime_post_norm.weight",
                            "layers.{i}.prime_post_norm.weight", (d,), suffix))
        for w, shape in (("w1", (d, fp)), ("w2", (fp, d)), ("w3", (d, fp))):
            table.append(_Entry(f"{_PRIME}feed_forward_prime.{w}.weight",
                                f"layers.{{i}}.prime.{w}.weight", shape, suffix, transpose=True))
    return table


def _check_official_layout(config: TTTConfig) -> None:
    """Refuse the Llama-family options the official checkpoints cannot hold (an imported
    Llama/Qwen model): the mapping would otherwise fail on a missing tensor or a shape."""
    differs = [f"{name}={value!r}" for name, value in config.to_dict().items()
               if name in OFFICIAL_LAYOUT and value != OFFICIAL_LAYOUT[name]]
    if differs:
        raise UserError(f"the official TTT-E2E layout has no {', '.join(differs)}; only models "
                        "with the official architecture convert to or from official tensors")


# The architecture fields as the official code has them (TTTConfig's defaults).
OFFICIAL_LAYOUT: dict[str, object] = dict(
    num_kv_heads=None, head_dim=None, qk_norm=True, post_norms=True, rope_layout="interleaved",
    rope_freq_scaling=None, tie_embeddings=True, qkv_bias=False, attn_out_bias=False,
    mlp_bias=False)


def official_shapes(config: TTTConfig) -> dict[str, tuple[int, ...]]:
    """Every official tensor name a checkpoint for CONFIG holds, with its stacked shape."""
    return {e.official: e.official_shape for e in _entries(config)}


def official_name_of(config: TTTConfig) -> dict[str, tuple[str, int | None]]:
    """tttlm name -> (official name, slice index on the stacked axis or None).

    Lets callers compare per-tensor quantities (e.g. fixture gradients) without a full
    conversion.
    """
    return {local: (e.official, j) for e in _entries(config) for j, local in e.local_names()}


def _shape_of(arrays: Mapping[str, Any], name: str) -> tuple[int, ...]:
    if name not in arrays:
        raise UserError(f"official tensor {name} is missing, so the model size cannot be "
                        "inferred; give the model_weights of a TTT-E2E checkpoint")
    return tuple(int(s) for s in np.shape(arrays[name]))


def _expect_rank(name: str, shape: tuple[int, ...], rank: int) -> None:
    if len(shape) != rank:
        raise UserError(f"official tensor {name} has shape {list(shape)}, not {rank} dims; "
                        "give the model_weights of a TTT-E2E checkpoint")


def infer_config(arrays: Mapping[str, Any], *, window: int = OFFICIAL_WINDOW,
                 chunk_size: int = OFFICIAL_CHUNK_SIZE, rope_theta: float = OFFICIAL_ROPE_THETA,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 variant: Variant | str | None = None) -> TTTConfig:
    """Build the :class:`TTTConfig` an official checkpoint was trained with, from its shapes.

    Checkpoints carry no config, but every size is visible in a tensor shape. What is not
    (window, chunk size, RoPE θ, token ids) defaults to the official TTT-E2E settings. Without
    prime storage the checkpoint cannot tell SWA from full attention, so VARIANT decides
    (``full`` by default). BOS/EOS default to the Llama-3 ids when the vocabulary has room for
    them; a smaller vocabulary means another tokenizer, whose BOS must be given explicitly
    because the loss mask depends on it. EOS then defaults to BOS, which is what joins documents
    in the official data.
    """
    wte = _shape_of(arrays, WTE)
    _expect_rank(WTE, wte, 2)
    vocab, hidden = wte
    seq_norm = _shape_of(arrays, SEQ_NORM)
    _expect_rank(SEQ_NORM, seq_norm, 2)
    layers = seq_norm[0]
    q_norm = _shape_of(arrays, Q_NORM)
    _expect_rank(Q_NORM, q_norm, 2)
    head_dim = q_norm[1]
    if head_dim <= 0 or hidden % head_dim:
        raise UserError(f"{Q_NORM} width {head_dim} does not divide hidden size {hidden}; "
                        "the checkpoint is not a TTT-E2E model tttlm can read")
    ffn = _shape_of(arrays, FFN_W1)
    _expect_rank(FFN_W1, ffn, 3)

    fields: dict[str, Any] = {}
    requested = None if variant is None else Variant(variant)
    if PRIME_W1 in arrays:
        if requested not in (None, Variant.E2E):
            raise UserError(
                f"the checkpoint has prime MLPs ({PRIME_W1}), so it is an e2e model; "
                f"drop --variant {requested.value} (it applies only to checkpoints without them)")
        prime = _shape_of(arrays, PRIME_W1)
        _expect_rank(PRIME_W1, prime, 3)
        fields.update(variant=Variant.E2E, num_ttt_layers=prime[0],
                      prime_intermediate_size=prime[2])
    else:
        if requested is Variant.E2E:
            raise UserError(
                f"variant e2e needs prime MLPs but the checkpoint has no {PRIME_W1}; "
                "pass --variant swa or --variant full")
        fields.update(variant=requested or Variant.FULL)

    if bos_token_id is None:
        if vocab <= OFFICIAL_BOS_ID:
            raise UserError(
                f"vocabulary size {vocab} has no room for the Llama-3 BOS id {OFFICIAL_BOS_ID}; "
                "pass the tokenizer's BOS id with --bos-id")
        bos_token_id = OFFICIAL_BOS_ID
    if eos_token_id is None:
        eos_token_id = OFFICIAL_EOS_ID if vocab > OFFICIAL_EOS_ID else bos_token_id

    return TTTConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=hidden // head_dim,
        intermediate_size=ffn[2], window=window, chunk_size=chunk_size,
        rope_theta=float(rope_theta), rms_norm_eps=1e-6, inner_lr=1.0, inner_clip=1.0,
        inner_lr_warmup_steps=0, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        **fields)


def _fmt(shape: tuple[int, ...]) -> str:
    return str(list(shape))


def from_official(arrays: Mapping[str, Any], config: TTTConfig) -> dict[str, torch.Tensor]:
    """Official arrays (stacked, ``[in, out]``) -> a tttlm ``state_dict`` (float32, contiguous).

    The set of names must match exactly: a missing tensor would leave a randomly initialised
    weight, and an extra one (an untied ``lm_head``, a different architecture) would be dropped
    silently, both of which give a model that loads but is wrong.
    """
    table = _entries(config)
    expected = {e.official for e in table}
    missing = [e.official for e in table if e.official not in arrays]
    if missing:
        raise UserError(f"official tensor {', '.join(missing)} missing from the checkpoint; "
                        "give a complete TTT-E2E checkpoint (or the right --variant)")
    extra = sorted(set(arrays) - expected)
    if extra:
        raise UserError(f"unexpected official tensors {', '.join(extra)} for a "
                        f"{config.variant.value} model: tttlm has no place for them; give the "
                        "checkpoint of a TTT-E2E model (e2e, swa or full)")
    out: dict[str, torch.Tensor] = {}
    for e in table:
        value = np.asarray(arrays[e.official])
        if value.shape != e.official_shape:
            raise UserError(f"official tensor {e.official} has shape {_fmt(value.shape)}, not "
                            f"{_fmt(e.official_shape)}; the checkpoint's tensors disagree with "
                            "each other: give a complete, unmodified checkpoint")
        for j, local in e.local_names():
            piece = value if j is None else value[j]
            if e.transpose:
                piece = piece.T
            out[local] = torch.from_numpy(np.array(piece, dtype=np.float32, order="C"))
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)


def to_official(tensors: Mapping[str, Any], config: TTTConfig) -> dict[str, np.ndarray]:
    """A mapping keyed like tttlm's ``state_dict`` -> official names and layout (float32 numpy).

    Works for weights and for anything keyed the same way (gradients, optimizer moments), so
    tttlm results can be compared with, or written back as, official tensors.
    """
    table = _entries(config)
    wanted = [local for e in table for _, local in e.local_names()]
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise ValueError(f"tttlm tensor {', '.join(missing)} missing from the state dict")
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise ValueError(f"unexpected tttlm tensors {', '.join(extra)} for a "
                         f"{config.variant.value} model; the official layout has no place for them")
    out: dict[str, np.ndarray] = {}
    for e in table:
        slices = []
        for _, local in e.local_names():
            piece = _to_numpy(tensors[local])
            if piece.shape != e.local_shape:
                raise ValueError(f"tttlm tensor {local} has shape {_fmt(piece.shape)}; "
                                 f"expected {_fmt(e.local_shape)}")
            slices.append(piece.T if e.transpose else piece)
        stacked = slices[0] if e.layers is None else np.stack(slices)
        out[e.official] = np.array(stacked, dtype=np.float32, order="C")
    return out


def load_official_arrays(src: str | Path) -> dict[str, np.ndarray]:
    """Official arrays from an Orbax checkpoint directory or from a ``.npz`` of official names.

    In a ``.npz``, keys containing ``/`` are skipped: the parity fixture stores inputs, results
    and gradients next to the parameters under such prefixed keys.
    """
    path = Path(src)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k].astype(np.float32, copy=False) for k in data.files if "/" not in k}
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the checkpoint path")
    from tttlm.convert.orbax import read_orbax

    return read_orbax(path)


def assumed_settings(config: TTTConfig, *, window: int | None = None,
                     chunk_size: int | None = None, rope_theta: float | None = None,
                     bos_token_id: int | None = None, eos_token_id: int | None = None,
                     variant: Variant | str | None = None) -> list[str]:
    """One line per setting of CONFIG that the checkpoint cannot tell and the caller left
    out (``None``), so it took a default: the value taken and the option that overrides it."""
    notes = []
    if variant is None and config.variant is not Variant.E2E:
        notes.append(f"variant {config.variant.value} (the checkpoint has no prime MLPs and "
                     "cannot tell sliding-window from full attention); pass --variant swa or "
                     "--variant full to choose")
    official = "the official TTT-E2E value; checkpoints do not record it"
    if window is None:
        unused = "" if config.uses_window else ", unused by full attention"
        notes.append(f"window k = {config.window} ({official}{unused}); pass --window K if "
                     "the model was trained with another")
    if chunk_size is None:
        unused = "" if config.variant is Variant.E2E else ", unused without test-time training"
        notes.append(f"TTT chunk size b = {config.chunk_size} ({official}{unused}); pass "
                     "--chunk B if the model was trained with another")
    if rope_theta is None:
        notes.append(f"RoPE theta = {config.rope_theta:g} ({official}); pass --rope-theta T if "
                     "the model was trained with another")
    if bos_token_id is None:
        notes.append(f"BOS id {config.bos_token_id} (Llama-3's; the loss mask depends on it); "
                     "pass --bos-id N if the tokenizer is not Llama-3's")
    if eos_token_id is None:
        source = ("Llama-3's" if config.eos_token_id == OFFICIAL_EOS_ID
                  else "the BOS id: the vocabulary has no room for Llama-3's")
        notes.append(f"EOS id {config.eos_token_id} ({source}); pass --eos-id N to choose "
                     "another")
    return notes


def convert_official(src: str | Path, dst: str | Path, *, window: int | None = None,
                     chunk_size: int | None = None, rope_theta: float | None = None,
                     bos_token_id: int | None = None, eos_token_id: int | None = None,
                     variant: Variant | str | None = None,
                     log: Callable[[str], None] | None = None) -> Path:
    """Convert an official checkpoint SRC into a tttlm model directory DST and return DST.

    Options left as ``None`` take the official TTT-E2E values (the ``OFFICIAL_*`` constants of
    :mod:`tttlm.config`: k 8192, b 1024, θ 500 000, Llama-3 token ids); each value so assumed
    is passed to ``log`` (see
    :func:`assumed_settings`) before anything is written. Loading is strict, so a mapping
    mistake fails here rather than producing a model that merely scores badly.
    """
    arrays = load_official_arrays(src)
    overrides: dict[str, Any] = {}
    if window is not None:
        overrides["window"] = window
    if chunk_size is not None:
        overrides["chunk_size"] = chunk_size
    if rope_theta is not None:
        overrides["rope_theta"] = rope_theta
    config = infer_config(arrays, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                          variant=variant, **overrides)
    if log is not None:
        for note in assumed_settings(config, window=window, chunk_size=chunk_size,
                                     rope_theta=rope_theta, bos_token_id=bos_token_id,
                                     eos_token_id=eos_token_id, variant=variant):
            log(f"assumed {note}")
    state = from_official(arrays, config)

    from tttlm.model import TTTForCausalLM

    model = TTTForCausalLM(config)
    model.load_state_dict(state, strict=True)
    out = Path(dst)
    model.save_pretrained(out)
    return out
