"""The TTT-E2E language model and its baselines, with the meta forward pass."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from tttlm.config import TTTConfig, Variant
from tttlm.errors import UserError
from tttlm.files import atomic_save, atomic_write_text
from tttlm.model.cache import ChunkKV, WholeSequence
from tttlm.model.cuda_graph import (
    ChunkBuffers,
    ChunkGraph,
    KeptGraph,
    can_capture,
    capture,
    run_eagerly,
)
from tttlm.model.layers import Block, ConvRecurrentMixer, KVBMixer, RMSNorm
from tttlm.ops.attention import get_attention_backend
from tttlm.ops.cache_swap import CacheSwap
from tttlm.ops.linear_nll import (
    MAX_BLOCK_ELEMENTS,
    head_weight_grad_unused,
    linear_nll,
    linear_nll_inner_step,
)
from tttlm.ops.loss import masked_mean, token_nll
from tttlm.ops.rope import config_rope_angles
from tttlm.ttt.base import InnerState, cat_states, index_state, map_state
from tttlm.ttt.fast import FastWeights, PrimeWeights, cat_fast, flatten_fast, index_fast
from tttlm.ttt.finite import FiniteGuard
from tttlm.ttt.modes import GradMode
from tttlm.ttt.optim import build_inner_optimizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
IGNORE_INDEX = -100
# ``ttt_group="auto"``: groups of sequences whose fast-weight working set (the fp32 weights in
# effect, their bf16 copies, the bf16 inner gradient, the updated fp32 weights, the chunk's
# activations) stays under this many bytes. Measured on an H200 at 3b, 8K x 16, bf16 autocast
# (benchmarks/results/prefill_groups_3b_8k.md): 6.0 GiB more peak memory per sequence read
# together, for 346M fast-weight parameters per sequence, i.e. about 19 bytes per parameter.
# 28 GiB: 3b reads 4 sequences together. Groups of 2 (16 GiB) left the host queueing a chunk's
# ~700 launches for 2 x 1024 rows about as slowly as the GPU ran them: on one H100 at 8K x 16
# (benchmarks/results/prefill_tiles_groups_3b_h100.md, section 2) groups of 2 / 4 / 8 took 0.02654 /
# 0.02419 / 0.02395 s per 1K tokens at 26.5 / 34.4 / 54.1 GiB peak.
# On a GPU with less memory the budget is a third of it (a 40 GB card: 3b in groups of 2, with
# room for the model's weights and activations; 80 GB and more: 4).
AUTO_GROUP_BYTES = 28 * 2**30
AUTO_GROUP_SHARE_OF_GPU = 3
FAST_BYTES_PER_PARAMETER = 19
# A chunk graph is captured only for at least this many chunks: its capture costs one or two
# chunks' time (3b at 128K on H100s: 45-57 ms against ~32 ms a chunk, 1.1-1.4% of the step;
# benchmarks/results/prefill_tiles_groups_3b_h100.md, section 3), which fewer replays would
# not win back.
GRAPH_MIN_CHUNKS = 4
# Where graph_chunks is None (the default), graphs are taken only where they were measured to
# win: one sequence at a time (the host then queues a chunk's ~1000 launches about as fast as
# the GPU runs them) and at least this many chunks to replay. 3b, one H100: 128K x 1 (119
# replays) 0.0464 -> 0.0443 s/1K; 32K x 4 in groups of 2 (23 replays each) 0.0375 -> 0.0420
# (benchmarks/results/prefill_graphs_3b.md).
GRAPH_AUTO_MIN_CHUNKS = 32

# Modules only TTT-E2E has (what `tttlm convert hf --to e2e` adds to a full-attention model).
TTT_MODULES = frozenset({"prime", "prime_norm", "prime_post_norm", "inner_optimizer"})


def is_ttt_parameter(name: str) -> bool:
    """Whether parameter ``name`` (a ``named_parameters`` name, wrappers' prefixes allowed)
    belongs to what TTT-E2E adds to a Transformer: the prime MLPs and their norms, a learned
    inner-LR scale."""
    return not TTT_MODULES.isdisjoint(name.split("."))


@contextlib.contextmanager
def constant_parameters(module: nn.Module) -> Iterator[None]:
    """Within this block none of ``module``'s parameters requires grad (those that did do
    again afterwards). For inner steps without an outer gradient: a region compiled by
    ``torch.compile`` computes, in its backward, the gradient of every input that requires one
    whether or not the caller asks for it (autograd prunes by the gradients it is asked for
    only between nodes, not inside one), so the frozen weights' gradients (a third of the TTT
    blocks' backward products) and the first TTT block's attention backward would run for
    nothing."""
    changed = [p for p in module.parameters() if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


@contextlib.contextmanager
def linear_weights_in(modules: Iterable[nn.Module], dtype: torch.dtype,
                      store: Casts | None = None) -> Iterator[None]:
    """Within this block the ``nn.Linear`` weights and biases of ``modules`` (prime MLPs
    apart: the fast weights stand in for theirs) are constant copies in ``dtype``; the
    originals come back afterwards. For the TTT chunks without an outer gradient under
    autocast to ``dtype``: a compiled chunk casts every constant weight again at each call
    (autocast's cache of casts keeps only weights that require grad, and compiled code does
    not use it), about 0.8 ms per chunk at 3b on an H200; autocast casts a weight already in
    its dtype to itself, so the products see the same values. ``store``: the copies are
    written into the same tensors at every entry (a kept CUDA graph reads them there)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in modules:
            for name, linear in module.named_modules():
                if not isinstance(linear, nn.Linear) or "prime" in name.split("."):
                    continue
                for attr in ("weight", "bias"):
                    p = getattr(linear, attr)
                    # (a parameter that is not a plain tensor, a DTensor under FSDP2, is
                    # FSDP's to gather and cast: left alone)
                    if (p is None or not p.is_floating_point() or p.dtype == dtype
                            or type(p.data) is not torch.Tensor):
                        continue
                    swapped.append((linear, attr, p))
                    setattr(linear, attr, _cast_of(p, dtype, store, (id(linear), attr)))
        yield
    finally:
        for linear, attr, p in reversed(swapped):
            setattr(linear, attr, p)


Casts = dict[tuple[int, str], tuple[nn.Parameter, nn.Parameter]]


def _cast_of(p: nn.Parameter, dtype: torch.dtype, store: Casts | None,
             key: tuple[int, str]) -> nn.Parameter:
    """A constant copy of ``p`` in ``dtype``: a new tensor, or with a ``store`` the one kept
    there for ``p`` under ``key``, overwritten with ``p``'s values (new when ``p`` is another
    parameter than the last time)."""
    kept = None if store is None else store.get(key)
    if kept is not None and kept[0] is p and kept[1].dtype == dtype \
            and kept[1].shape == p.shape and kept[1].device == p.device:
        with torch.no_grad():
            kept[1].copy_(p)
        return kept[1]
    cast = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    if store is not None:
        store[key] = (p, cast)
    return cast


@contextlib.contextmanager
def head_weight_in(model: TTTForCausalLM, dtype: torch.dtype,
                   store: Casts | None = None) -> Iterator[None]:
    """Within this block the output head's weight (the tied embedding, or ``lm_head``) is a
    constant copy in ``dtype``; the original comes back afterwards. For the TTT chunks
    without an outer gradient under autocast to ``dtype``, as :func:`linear_weights_in`:
    inside a chunk's CUDA graph autocast's cache is off, so every product with the head
    (the logits, and the inner step's ``dlogits @ W``) cast its 128256 x 2560 weight again,
    twice a chunk: most of the 178 ms of casts in a 3b 128K x 1 step's 4.9 s of kernels on an
    H100 (``benchmarks/results/prefill_inplace_3b_h100.md``). The products see the same
    values. ``store``: as for :func:`linear_weights_in`."""
    owner = model.embed if model.lm_head is None else model.lm_head
    p = owner.weight
    if p.dtype == dtype or not p.is_floating_point() or type(p.data) is not torch.Tensor:
        yield  # (already cast by an enclosing run; a DTensor is FSDP's to cast)
        return
    owner.weight = _cast_of(p, dtype, store, (id(owner), "weight"))
    try:
        yield
    finally:
        owner.weight = p


@dataclass
class TTTOutput:
    """What a forward pass returns.

    Attributes:
        loss: scalar training loss (``None`` without labels). TTT-E2E (with or without TTT):
            mean over sequences of each sequence's weighted mean of chunk losses, a chunk of
            ``c`` tokens weighing ``c / chunk_size`` (so with full chunks: the mean of chunk
            means, the official rule). ``swa``/``full``: mean NLL over all counted tokens.
        token_nll: ``[B, T]`` NLL of every target, unmasked; with TTT each token is predicted
            with the fast weights from before its chunk's update.
        chunk_losses: ``[B, n_chunks]`` masked mean NLL of each chunk (last may be partial).
        logits: ``[B, T, V]`` when asked for with ``return_logits=True`` (or without labels).
        inner_update_norms: ``[B, n_updates]`` L2 norm of each inner update (TTT only).
        fast_weights: with ``return_fast_weights=True``, the fast weights after each chunk's
            update: a list over chunks of ``{state_dict name: [B, ...] tensor}``.
    """

    loss: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None
    chunk_losses: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    inner_update_norms: torch.Tensor | None = None
    fast_weights: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)


KVPair = tuple[torch.Tensor, torch.Tensor]  # a TTT block's cache: keys (before RoPE), values


@dataclass(frozen=True)
class ForwardOptions:
    """Everything that chooses how one forward pass runs, resolved once at its top
    (:meth:`TTTForCausalLM.options`).

    Attributes:
        ttt: inner updates on (meta forward) or off (pretrain mode).
        mode: how the outer gradient treats the inner steps; ``NONE`` when no outer gradient
            is taken (gradients off: evaluation, prefill, decoding). Then the TTT blocks' caches
            are constants, which the attention kernels exploit (``frozen`` keys).
        inner_lr: η of the inner steps.
        checkpoint_chunks: recompute each chunk in the backward pass (outer gradient only).
        lean_head: recompute the head's logits in backward passes instead of keeping them.
        compiled: run the code around attention through ``torch.compile``: the
            whole-sequence blocks always, the TTT chunks as :attr:`compile_chunks` decides;
            and the head's elementwise work over the logits (inside autograd Functions
            with their own derivatives, so in every mode).
        graph_chunks: without an outer gradient, once the TTT caches are full, capture one
            chunk's step as a CUDA graph and replay it for the later chunks of the run
            (:class:`~tttlm.model.cuda_graph.ChunkGraph`; off a GPU the same buffers run
            eagerly); with ``TTTForCausalLM.keep_chunk_graph``, a run that repeats the last
            one's shapes also captures the chunks while the caches fill, a graph per length.
            ``None``: where they were measured to win: a CUDA device, one sequence at a time
            and at least ``GRAPH_AUTO_MIN_CHUNKS`` chunks to replay (or graphs kept from an
            earlier run). From ``TTTForCausalLM.graph_chunks``.
        ttt_group: without an outer gradient, run the TTT chunks of at most this many
            sequences at a time (``None``: all). Each sequence's fast weights, their gradient
            and their update are ``[B, ...]`` fp32 tensors (1.4 GB per sequence at 3b), so
            their memory grows with the batch, not with the tokens; groups bound it.
            (``TTTForCausalLM.ttt_group="auto"`` resolves to a number here.)
    """

    ttt: bool
    mode: GradMode
    inner_lr: float
    checkpoint_chunks: bool = False
    lean_head: bool = True
    compiled: bool = False
    graph_chunks: bool | None = False
    ttt_group: int | None = None

    @property
    def compile_chunks(self) -> bool:
        """Whether the TTT chunks run compiled: only when no outer gradient is taken
        (evaluation, prefill). The exact and first-order meta-gradients differentiate a chunk's
        graph twice (gradients of gradients), which compiled graphs do not support: eager
        there. The one place this rule lives."""
        return self.compiled and self.mode is GradMode.NONE


@dataclass
class ChunkRun:
    """What :meth:`TTTForCausalLM.run_ttt_chunks` returns: per chunk the NLL ``[B, c]``, the
    chunk loss ``[B]``, the logits (or ``None``), per update its norms ``[B]`` (and the fast
    weights after it, when asked for); the caches after the last chunk and at its start; the
    fast weights and the inner optimizer's state after the last update; the last chunk's
    output."""

    nll: list[torch.Tensor] = field(default_factory=list)
    chunk_losses: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor | None] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)
    caches: list[KVPair] = field(default_factory=list)
    start_caches: list[KVPair] = field(default_factory=list)
    fast: FastWeights = field(default_factory=list)
    inner_state: InnerState = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # the last chunk's output [B, c, D]


def auto_group_budget(gpu_memory: int | None) -> int:
    """The fast-weight working set that ``ttt_group="auto"`` keeps a group under:
    ``AUTO_GROUP_BYTES``, or a third of a GPU's ``gpu_memory`` bytes where that is less
    (``None``: not on a GPU)."""
    if gpu_memory is None:
        return AUTO_GROUP_BYTES
    return min(AUTO_GROUP_BYTES, gpu_memory // AUTO_GROUP_SHARE_OF_GPU)


class TTTForCausalLM(nn.Module):
    """A Llama-like Transformer whose last blocks learn at test time (TTT-E2E).

    The first ``num_prefix_layers`` blocks run once over the whole sequence with
    sliding-window attention; the TTT blocks run chunk by chunk, and after each chunk one SGD
    step on the chunk's next-token loss updates their prime MLPs ("fast weights"), separately
    for every sequence of the batch. The ``swa`` and ``full`` variants are the same network
    without prime MLPs, with sliding-window or full causal attention.
    """

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        # Loaded now, not on first use inside a forward (SDPA's causal bias and flex attention
        # load it): importing torch._dynamo runs torch.fx.wrap, whose frame refers to itself
        # and to every frame below it, so the first forward's activations and an engine's
        # first state stayed alive until the next full garbage collection.
        import torch._dynamo  # noqa: F401
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        first_ttt = config.num_prefix_layers
        self.layers = nn.ModuleList(
            Block(config, has_prime=i >= first_ttt and config.variant is Variant.E2E,
                  mixer=config.layer_mixer(i))
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The official head is the embedding; imported models may have their own.
        self.lm_head: nn.Linear | None = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.variant is Variant.E2E:
            # An optimizer without meta-learned parameters (the official SGD) adds no key to
            # the state dict.
            options = {"beta": config.inner_momentum} if config.inner_optimizer == "momentum" \
                else {}
            self.inner_optimizer = build_inner_optimizer(
                config.inner_optimizer, config.num_ttt_layers or 0, **options)
        # Recompute the head's logits in backward passes instead of keeping them: much less
        # activation memory at a 128K vocabulary, at some extra time (benchmarks/results).
        self.lean_head = True
        # torch.compile the code around attention in every block (fused norms, RoPE, casts):
        # whole-sequence blocks always, TTT chunks in inference and prefill (one backward per
        # chunk graph). Meta-gradients differentiate the chunks' graphs twice (exact) or
        # backward through them twice (first order), which compiled graphs do not support.
        self.compile_blocks = False
        # Without an outer gradient, the TTT chunks of at most this many sequences run at a
        # time (ForwardOptions.ttt_group): bounds the per-sequence fast-weight memory. "auto":
        # as many as keep it under AUTO_GROUP_BYTES (see auto_ttt_group); None: all.
        self.ttt_group: int | str | None = "auto"
        # Without an outer gradient, replay the step of a TTT chunk over full caches as a CUDA
        # graph (ForwardOptions.graph_chunks): one launch per chunk instead of a thousand.
        # None: where that was measured to win (GRAPH_AUTO_MIN_CHUNKS); True / False: always
        # (from GRAPH_MIN_CHUNKS on) / never.
        self.graph_chunks: bool | None = None
        # Keep the chunk graphs for the next runs of the same shapes (release_chunk_graph
        # frees them): their captures are paid once per model and shape, not at every
        # prefill; a run that repeats the last one's shapes graphs the filling chunks too.
        self.keep_chunk_graph = True
        self._kept_graph = KeptGraph()
        # Warned once that labels equal input_ids (the Hugging Face habit; see _check_inputs).
        self._warned_unshifted = False
        self.reset_parameters()

    # ----------------------------------------------------------------------------- setup
    def reset_parameters(self) -> None:
        """Official init: every matrix and the embedding ~ N(0, initializer_range); norms 1;
        biases (imported architectures only) 0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, (KVBMixer, ConvRecurrentMixer)):
                module.reset_parameters()

    @property
    def prefix_layers(self) -> list[Block]:
        return list(self.layers[: self.config.num_prefix_layers])

    @property
    def ttt_layers(self) -> list[Block]:
        return list(self.layers[self.config.num_prefix_layers:])

    def fast_weight_names(self) -> list[str]:
        """state_dict names of the fast weights, in the order the inner step uses them."""
        first = self.config.num_prefix_layers
        return [f"layers.{first + j}.prime.{w}.weight"
                for j in range(len(self.ttt_layers)) for w in ("w1", "w2", "w3")]

    def initial_fast_weights(self, batch: int) -> FastWeights:
        """The meta-learned W₀ of every TTT layer, one (broadcast) copy per sequence."""
        return [PrimeWeights(*(w.unsqueeze(0).expand(batch, *w.shape)
                               for w in layer.prime.weights())) for layer in self.ttt_layers]

    def auto_ttt_group(self, budget: int | None = None) -> int | None:
        """The ``ttt_group`` that ``"auto"`` means: the most sequences whose TTT chunks, run
        together, keep the fast-weight working set under ``budget`` bytes (at least one);
        ``None`` (all) for a model without fast weights. ``budget`` defaults to
        :func:`auto_group_budget` of the device the model is on: 3b then reads 4 sequences
        together (346M fast-weight parameters each) on a GPU of 80 GB or more, 2 on one of
        40 GB; 760m 17 and 125m 137 on a CPU. Grouping leaves results unchanged (sequences are
        independent without an outer gradient) and costs little time once a group fills the
        GPU and the host keeps up with its launches (3b at 8K x 16 on one H100: groups of 4
        within 1% of groups of 8, at 34 GiB peak instead of 54)."""
        if budget is None:
            device = self.embed.weight.device
            budget = auto_group_budget(torch.cuda.get_device_properties(device).total_memory
                                       if device.type == "cuda" else None)
        per_sequence = sum(w.numel() for layer in self.ttt_layers
                           for w in layer.prime.weights()) * FAST_BYTES_PER_PARAMETER
        if per_sequence == 0:
            return None
        return max(1, budget // per_sequence)

    def resolved_ttt_group(self) -> int | None:
        """:attr:`ttt_group` as a number of sequences (``None``: all), ``"auto"`` resolved."""
        if self.ttt_group == "auto":
            return self.auto_ttt_group()
        if self.ttt_group is not None and (not isinstance(self.ttt_group, int)
                                           or self.ttt_group < 1):
            raise ValueError(f"ttt_group={self.ttt_group!r}: give a number of sequences "
                             "(at least 1), 'auto' or None (all at once)")
        return self.ttt_group

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, *, ttt: bool | None = None,
                inner_lr: float | None = None, grad_mode: GradMode | str | None = None,
                checkpoint_chunks: bool | None = None, return_logits: bool = False,
                return_fast_weights: bool = False) -> TTTOutput:
        """Run the model on ``input_ids [B, T]``.

        Args:
            labels: ``[B, T]`` target of every position (already shifted: ``labels[:, t]`` is
                the token after ``input_ids[:, t]``, as the official ``target_tokens``).
                ``-100`` marks a target that is not counted.
            loss_mask: ``[B, T]`` bool/0-1 mask of counted targets (default: all counted).
            ttt: run the meta forward pass with inner updates (default: True for ``e2e``).
                ``False`` is "pretrain mode": the same network, no updates.
            inner_lr: η for this call (default ``config.inner_lr``; trainers pass the warmed-up
                value from ``config.inner_lr_at(step)``).
            grad_mode: ``exact`` (second order, default) or ``first_order`` outer gradient.
            checkpoint_chunks: recompute each chunk's activations in the backward pass instead
                of keeping them (same losses and gradients, less memory).
            return_logits: also return ``[B, T, V]`` logits (memory-hungry at long context).
            return_fast_weights: also run the last chunk's update and return the fast weights
                after every chunk.
        """
        opts = self.options(ttt=ttt, inner_lr=inner_lr, grad_mode=grad_mode,
                            checkpoint_chunks=checkpoint_chunks)
        labels, mask = self._check_inputs(input_ids, labels, loss_mask, opts.ttt)
        if labels is None:
            return_logits = True
        if opts.ttt and torch.is_inference_mode_enabled():
            # The inner step needs autograd, which inference tensors refuse: leave inference
            # mode for the call, record nothing outside the inner step, return plain tensors.
            with torch.inference_mode(False), torch.no_grad():
                cloned = [t.clone() if t is not None else None for t in (input_ids, labels, mask)]
                return self._meta_forward(*cloned, opts, return_logits, return_fast_weights)
        if opts.ttt:
            return self._meta_forward(input_ids, labels, mask, opts, return_logits,
                                      return_fast_weights)
        return self._pretrain_forward(input_ids, labels, mask, opts, return_logits)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states ``[B, T, D]`` of ``input_ids [B, T]``: what the head
        reads, in pretrain mode (no inner updates; for ``e2e`` the prime MLPs at their
        meta-learned weights). For a sequence no longer than a chunk the meta forward computes
        the same, up to rounding: a chunk is predicted before its own update."""
        self._check_inputs(input_ids, None, None, ttt=False)
        return self.norm(self.run_blocks(self.embed(input_ids), list(self.layers)))

    def options(self, *, ttt: bool | None = None, inner_lr: float | None = None,
                grad_mode: GradMode | str | None = None,
                checkpoint_chunks: bool | None = None) -> ForwardOptions:
        """The options of one forward pass, resolved from the arguments, the model's
        ``lean_head`` / ``compile_blocks`` settings and autograd's state (no outer gradient
        when gradients are off)."""
        config = self.config
        is_e2e = config.variant is Variant.E2E
        ttt = is_e2e if ttt is None else ttt
        if ttt and not is_e2e:
            raise ValueError(f"ttt=True needs an e2e model; this one is {config.variant.value!r} "
                             "(it has no fast weights): call it with ttt=False")
        outer = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        mode = GradMode(grad_mode if grad_mode is not None else GradMode.EXACT) if outer \
            else GradMode.NONE
        return ForwardOptions(
            ttt=ttt, mode=mode, inner_lr=config.inner_lr if inner_lr is None else inner_lr,
            checkpoint_chunks=bool(checkpoint_chunks) and mode is not GradMode.NONE,
            lean_head=self.lean_head, compiled=self.compile_blocks,
            graph_chunks=(None if self.graph_chunks is None else bool(self.graph_chunks))
            if mode is GradMode.NONE else False,
            ttt_group=self.resolved_ttt_group())

    def _check_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None,
                      loss_mask: torch.Tensor | None,
                      ttt: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = (tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor)
                     else type(input_ids).__name__)
            raise ValueError(f"input_ids must be a [batch, length] tensor, got {shape}; "
                             "add a batch axis with input_ids[None]")
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty integer tensor, got dtype "
                             f"{input_ids.dtype} and shape {tuple(input_ids.shape)}; give at "
                             "least one sequence of at least one token")
        # Value checks read the device: a sync, forbidden while a CUDA graph is captured (the
        # eager warm-up calls before a capture check the same static buffers).
        check_values = not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())
        lo, hi = (int(input_ids.min()), int(input_ids.max())) if check_values else (0, 0)
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids contain token id {lo if lo < 0 else hi} outside the "
                             f"model's vocabulary [0, {self.config.vocab_size})")
        if labels is None:
            if ttt:
                raise ValueError("test-time training learns from the next-token loss: pass "
                                 "labels (the token after each input), or call with ttt=False")
            return None, None
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}; labels[:, t] is the target of input t")
        ignored = labels == IGNORE_INDEX
        bad = (~ignored) & ((labels < 0) | (labels >= self.config.vocab_size))
        if check_values:
            # One read of the device for both checks.
            watch = not self._warned_unshifted and not torch.compiler.is_compiling()
            flags = torch.stack((bad.any(), _unshifted(input_ids, labels, ignored) if watch
                                 else bad.new_zeros(()))).tolist()
            if flags[0]:
                raise ValueError(f"labels contain id {int(labels[bad][0])} outside the "
                                 f"vocabulary [0, {self.config.vocab_size}) (use -100 to ignore "
                                 "a target)")
            if flags[1]:
                self._warned_unshifted = True
                warnings.warn(
                    "labels equal input_ids position for position: tttlm labels are already "
                    "shifted (labels[:, t] is the token after input_ids[:, t]), so this loss "
                    "teaches copying; pass labels=input_ids[:, 1:] with input_ids[:, :-1] "
                    "(the Hugging Face habit labels=input_ids is wrong here)",
                    UserWarning, stacklevel=3)
        if loss_mask is not None and loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        mask = ~ignored if loss_mask is None else ~ignored & loss_mask.bool()
        return labels.masked_fill(ignored, 0).long(), mask

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin tables ``[T, d/2]`` of ``positions [T]`` in the model's dtype."""
        dtype = self.embed.weight.dtype
        return config_rope_angles(positions, self.config, dtype)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head ``[V, D]``: the embedding (tied, official) or ``lm_head``."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def head_nll(self, h: torch.Tensor, labels: torch.Tensor | None, keep_logits: bool,
                 outer_graph: bool = True, lean: bool | None = None, inner_step: bool = False,
                 compiled: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Final norm, tied head and per-token NLL (fp32) for ``h [B, c, D]``; returns the NLL
        ``[B, c]`` (with ``labels``) and the logits ``[B, c, V]`` (with ``keep_logits``).

        ``outer_graph=False`` says that at most one backward pass (an inner step) will run
        through the result: then keeping the logits costs a transient ``[B, c, V]`` only and
        saves the lean head's recomputation. ``lean``: recompute the logits in backward passes
        (default: the model's ``lean_head``). ``inner_step`` (with ``outer_graph=False``): that
        pass will come, for the inner step, so the NLL's gradient with respect to ``h`` is
        formed with the NLL from one product with the head (:func:`linear_nll_inner_step`).
        ``compiled``: the elementwise work over the logits of the lean and inner-step heads
        runs fused by ``torch.compile`` (their derivatives are written out, so this holds in
        every mode, gradients of gradients included).
        """
        lean = self.lean_head if lean is None else lean
        x = self.norm(h)
        if labels is not None and not keep_logits and inner_step and not outer_graph:
            return linear_nll_inner_step(x, self.head_weight, labels, compiled), None
        # Logits larger than one of the lean head's row blocks (a chunk of many sequences) are
        # not kept either: the lean head forms them a block of rows at a time.
        large = h.shape[0] * h.shape[1] * self.config.vocab_size > MAX_BLOCK_ELEMENTS
        if labels is not None and not keep_logits and (large or lean and outer_graph):
            # Recomputes the logits in the backward passes instead of keeping [B, c, V] tensors.
            return linear_nll(x, self.head_weight, labels, compiled), None
        # F.linear, not x @ W.mT: autocast casts W once per region, not once per chunk
        logits = F.linear(x, self.head_weight)  # [B, c, V]
        nll = token_nll(logits, labels) if labels is not None else None
        return nll, (logits if keep_logits else None)

    def chunks(self, T: int) -> list[tuple[int, int]]:
        """``(start, end)`` of the chunks of a length-``T`` sequence (the last may be short)."""
        b = self.config.chunk_size
        return [(s, min(s + b, T)) for s in range(0, T, b)]

    def _assemble(self, nll: torch.Tensor, mask: torch.Tensor,
                  chunk_losses: torch.Tensor, ttt_weighting: bool) -> torch.Tensor:
        if ttt_weighting:
            # Built on the device from Python numbers (no host-to-device copy, so that a step
            # can be captured in a CUDA graph): every chunk weighs 1 but a short last one.
            chunks = self.chunks(nll.shape[1])
            weights = chunk_losses.new_ones(len(chunks))
            s, e = chunks[-1]
            if e - s != self.config.chunk_size:
                weights[-1] = (e - s) / self.config.chunk_size
            return ((chunk_losses * weights).sum(-1) / weights.sum()).mean()
        m = mask.to(nll.dtype)
        return (nll * m).sum() / m.sum().clamp_min(1e-10)

    # -------------------------------------------------------------------- whole sequences
    def run_blocks(self, h: torch.Tensor, layers: list[Block],
                   rings: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                   compiled: bool | None = None) -> torch.Tensor:
        """``layers`` over whole sequences ``h [B, T, D]`` at positions ``0 .. T-1`` (prefix
        blocks, pretrain mode, baselines; training, evaluation and a fresh prefill alike).
        ``rings``: per layer, decoding buffers that receive the last keys (see
        :class:`~tttlm.model.cache.WholeSequence`). ``layers`` start at block 0 (the prefix
        blocks, or all): block ``i`` attends over ``config.layer_window(i)``."""
        config = self.config
        T = h.shape[1]
        rope = self.rope_tables(torch.arange(T, device=h.device))
        compiled = self.compile_blocks if compiled is None else compiled
        for i, layer in enumerate(layers):
            cache = WholeSequence(rope, config.layer_window(i), config.chunk_size,
                                  None if rings is None else rings[i])
            h = layer(h, cache, compiled=compiled)
        return h

    # ------------------------------------------------------------------- pretrain mode
    def _pretrain_forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None,
                          mask: torch.Tensor | None, opts: ForwardOptions,
                          return_logits: bool) -> TTTOutput:
        config = self.config
        T = input_ids.shape[1]
        h = self.run_blocks(self.embed(input_ids), list(self.layers), compiled=opts.compiled)
        nlls, logits = [], []
        for s, e in self.chunks(T):
            nll, lg = self.head_nll(h[:, s:e], None if labels is None else labels[:, s:e],
                                    return_logits, lean=opts.lean_head, compiled=opts.compiled)
            nlls.append(nll)
            logits.append(lg)
        out = TTTOutput(logits=torch.cat(logits, 1) if return_logits else None)
        if labels is None:
            return out
        assert mask is not None
        out.token_nll = torch.cat(nlls, 1)
        out.chunk_losses = torch.stack(
            [masked_mean(out.token_nll[:, s:e], mask[:, s:e]) for s, e in self.chunks(T)], 1)
        out.loss = self._assemble(out.token_nll, mask, out.chunk_losses,
                                  config.variant is Variant.E2E)
        return out

    # ----------------------------------------------------------------------- meta mode
    def _meta_forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                      mask: torch.Tensor, opts: ForwardOptions, return_logits: bool,
                      return_fast_weights: bool) -> TTTOutput:
        # 1. Prefix blocks once over the whole sequence (absolute positions, first order).
        h = self.run_blocks(self.embed(input_ids), self.prefix_layers, compiled=opts.compiled)
        if opts.mode is GradMode.NONE:
            h = h.detach()
        # 2. TTT blocks chunk by chunk with per-sequence fast weights and rolling KV caches.
        run = self.run_ttt_chunks(h, labels, mask, opts, learn_last=return_fast_weights,
                                  return_logits=return_logits,
                                  return_fast_weights=return_fast_weights,
                                  return_state=False)
        out = TTTOutput(token_nll=torch.cat(run.nll, 1),
                        chunk_losses=torch.stack(run.chunk_losses, 1))
        out.loss = self._assemble(out.token_nll, mask, out.chunk_losses, ttt_weighting=True)
        B = input_ids.shape[0]
        out.inner_update_norms = torch.stack(run.norms, 1) if run.norms else h.new_zeros(B, 0)
        out.logits = torch.cat(run.logits, 1) if return_logits else None
        out.fast_weights = run.history if return_fast_weights else None
        return out

    def run_ttt_chunks(self, h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                       opts: ForwardOptions, *, caches: list[KVPair] | None = None,
                       fast: FastWeights | None = None, inner_state: InnerState | None = None,
                       learn_last: bool = False,
                       return_logits: bool = False,
                       return_fast_weights: bool = False,
                       return_state: bool = True) -> ChunkRun:
        """The TTT blocks over ``h [B, T, D]`` (the prefix blocks' output), chunk by chunk:
        each chunk is predicted with the current fast weights, then (all but the last, unless
        ``learn_last``) takes one inner step on its loss. The training forward and the
        engine's prefill both run this.

        ``caches``: per TTT block, the keys (before RoPE) and values ``[B, past, H, d]`` of
        what precedes ``h`` (default: nothing); ``fast``: the fast weights in effect (default:
        the meta-learned W₀); ``inner_state``: the inner optimizer's state (default: its
        initial state). ``return_state=False``: the caller does not read the caches, fast
        weights and inner state after the last chunk (they may be left empty).
        """
        config = self.config
        B = h.shape[0]
        group = opts.ttt_group
        grouped = (group is not None and group < B and opts.mode is GradMode.NONE
                   and not return_fast_weights)
        graphs, min_chunks = opts.graph_chunks, GRAPH_MIN_CHUNKS
        if graphs is None:
            graphs, min_chunks = (can_capture(h.device) and (group if grouped else B) == 1,
                                  GRAPH_AUTO_MIN_CHUNKS)
        keep = bool(graphs) and self.keep_chunk_graph and opts.mode is GradMode.NONE
        # Without an outer gradient under autocast, the constant weights of the TTT blocks and
        # the head are cast once for the run (every group), not inside every compiled chunk or
        # graph (the same products); a nested run finds them cast already.
        cast = (self._constants_in(self.compute_dtype(h), keep)
                if opts.mode is GradMode.NONE and torch.is_autocast_enabled(h.device.type)
                else contextlib.nullcontext())
        if grouped:
            with cast:
                return self._grouped_chunks(h, labels, mask, opts, group, caches, fast,
                                            inner_state, learn_last, return_logits,
                                            return_state)
        window, b = config.window, config.chunk_size
        # RoPE in the TTT blocks uses local positions: the chunk's keys sit at window .. +c-1.
        local = self.rope_tables(torch.arange(window + b, device=h.device))
        if fast is None:
            fast = self.initial_fast_weights(B)
        if inner_state is None:
            inner_state = self.inner_optimizer.init_state(fast)
        if opts.mode is not GradMode.NONE and not all(
                w.requires_grad for w in flatten_fast(fast)):
            # Frozen prime MLPs still learn at test time: give the inner step leaves to
            # differentiate, while the outer gradient reaches every other trainable weight.
            fast = [PrimeWeights(*(w.detach().requires_grad_(True) for w in layer))
                    for layer in fast]
        if caches is None:
            # Without an outer gradient the caches hold keys and values in the dtype the blocks
            # compute in (bf16 under autocast): the projections' own values, so the same
            # results bit for bit, at half the bytes of fp32 copies (an empty fp32 start
            # promoted every later concatenation to fp32, and attention cast it back per
            # chunk). With an outer gradient, their gradients keep accumulating in h's dtype.
            dtype = self.compute_dtype(h) if opts.mode is GradMode.NONE else h.dtype
            empty = h.new_zeros(B, 0, config.num_kv_heads, config.head_dim, dtype=dtype)
            caches = [(empty, empty) for _ in self.ttt_layers]
        chunks = self.chunks(h.shape[1])
        run = ChunkRun()

        def snapshot(fast: FastWeights) -> dict[str, torch.Tensor]:
            return dict(zip(self.fast_weight_names(), flatten_fast(fast)))

        # Updates in place (the official SGD at test time): each update writes the run's own
        # weights and their copies in the compute dtype where it is finite, in one pass: no
        # new weights, no cast of them at the next chunk, no guard.
        in_place = (opts.mode is GradMode.NONE and self.inner_optimizer.updates_in_place
                    and not return_fast_weights and not opts.checkpoint_chunks)
        if in_place and opts.ttt and (len(chunks) > 1 or learn_last):
            # The run's own copy of W0 (the caller's weights, or views of the parameters)
            # before its first update, which is then written in place as every later one is,
            # where finite, on the device: no update waits for the host to read another's
            # check. (The first update used to make new weights and the first update in place
            # to read their check: the host waited there for the prefix blocks and that
            # chunk, so it queued each later eager chunk only as the GPU ran the one before.)
            fast = [PrimeWeights(*(w.detach().clone(memory_format=torch.contiguous_format)
                                   for w in layer)) for layer in fast]
            inner_state = map_state(lambda t: t.detach().clone(), inner_state)
        low: FastWeights | None = None  # the compute-dtype copies of ``low_of``
        low_of: FastWeights | None = None
        kept = self._kept_graph
        key = (self._graph_key(h, caches, fast, inner_state, opts, return_logits, in_place)
               if keep else None)
        # Graphs of the chunks while the caches fill (one per length) only for a run that
        # repeats the last one's shapes: their captures cost about a chunk's time each.
        filling = keep and kept.last == key
        with cast:
            # Test time: each update's finiteness is read while the next chunk runs.
            guard = FiniteGuard(deferred=True) if opts.mode is GradMode.NONE else None
            own: ChunkGraph | None = None  # the run's steady graph where none is kept
            used: ChunkBuffers | None = None
            for i, (s, e) in enumerate(chunks):
                update = opts.ttt and (i < len(chunks) - 1 or learn_last)
                past = caches[0][0].shape[1]
                rows = slice(window - past, window + e - s)
                rope = (local[0][rows], local[1][rows])
                run.start_caches = caches
                # contiguous: compiled blocks then see one input layout for every chunk
                args = (h[:, s:e].contiguous(), labels[:, s:e], mask[:, s:e], s, rope, caches, fast,
                        inner_state, opts, update, return_logits, guard)
                # A graph takes a whole chunk with an update; not the last chunk, whose
                # starting caches the caller keeps (the graph's are overwritten). Over full
                # caches (the steady state) a new one is made only where enough chunks are
                # left to pay for its capture; one kept from an earlier run serves any number.
                graph, make = None, False
                if (graphs and guard is not None and update and e - s == b
                        and i < len(chunks) - 1 and not return_fast_weights):
                    full = past == window
                    graph = kept.find(key, past) if keep else (own if full else None)
                    make = graph is None and (len(chunks) - 1 - i >= min_chunks if full
                                              else filling and past % b == 0)
                if graph is not None or make:
                    if guard.pending and (settled := guard.settle()) is not None:
                        guard.pop_corrected()
                        fast, inner_state = settled
                        args = (*args[:6], fast, inner_state, *args[8:])
                    if make:
                        graph = ChunkGraph(self, *args[:9], return_logits,
                                           capture if can_capture(h.device) else run_eagerly,
                                           kept.buffers_for(key) if keep else None)
                        if keep:
                            kept.keep(key, past, graph)
                        else:
                            own = graph
                    used = graph.buffers
                    result = graph.step(args[0], args[1], args[2], caches, fast, inner_state)
                elif opts.checkpoint_chunks:
                    result = checkpoint(self.ttt_chunk, *args, use_reentrant=False)
                elif in_place and update and guard is not None:
                    if low_of is not fast:
                        low, low_of = self._inner_leaves(fast, h), fast
                    result = self.ttt_chunk(*args[:11], None, True, low)
                else:
                    result = self.ttt_chunk(*args)
                if guard is not None and (corrected := guard.pop_corrected()) is not None:
                    # The previous update was not finite for some sequences: they kept their
                    # weights, and this chunk ran on them.
                    fast, inner_state = corrected
                    if return_fast_weights:
                        run.history[-1] = snapshot(fast)
                nll, chunk_loss, lg, caches, new_fast, new_state, norm, run.hidden = result
                run.nll.append(nll)
                run.chunk_losses.append(chunk_loss)
                run.logits.append(lg)
                if update:
                    fast, inner_state = new_fast, new_state
                    run.norms.append(norm)
                    if return_fast_weights:
                        run.history.append(snapshot(fast))
            if guard is not None and (settled := guard.settle()) is not None:
                fast, inner_state = settled
                if return_fast_weights:
                    run.history[-1] = snapshot(fast)
        if keep:
            kept.last = key
            if used is not None and return_state:
                # The kept graphs' next replays overwrite their buffers: the run returns its own.
                caches, fast, inner_state = used.own_copies(caches, fast, inner_state)
                run.start_caches = used.own_copies(run.start_caches, [], {})[0]
        run.caches, run.fast, run.inner_state = caches, fast, inner_state
        return run

    @contextlib.contextmanager
    def _constants_in(self, dtype: torch.dtype, keep: bool) -> Iterator[None]:
        """The TTT blocks' constant weights and the head in ``dtype`` within this block
        (``keep``: in the tensors a kept chunk graph reads)."""
        store = self._kept_graph.casts if keep else None
        with linear_weights_in(self.ttt_layers, dtype, store), \
                head_weight_in(self, dtype, store):
            yield

    def release_chunk_graph(self) -> None:
        """Free the chunk graphs kept for later runs (``keep_chunk_graph``) and the constant
        weights' casts they read, held between runs: at 3b for one sequence, by their
        shapes, 1.8 GB of bf16 casts, 0.7 GB of caches (one window: the filling chunks'
        caches are views of it), 2.1 GB of fast weights (fp32 and bf16), and the steps'
        activations in the graphs' one pool. The next run that takes a graph captures a new
        one, and only a run after it the filling chunks' graphs."""
        self._kept_graph.release()

    def _graph_key(self, h: torch.Tensor, caches: list[KVPair], fast: FastWeights,
                   inner_state: InnerState, opts: ForwardOptions, keep_logits: bool,
                   in_place: bool) -> tuple[Any, ...]:
        """What the chunk graphs of a run shape depend on beyond their own buffers: the
        configuration, shapes and dtypes (the caches' but their length, which each graph is
        kept by), options, autocast, the attention backend, and the addresses of the tensors
        they read (the parameters, the constant weights' casts while they stand in, the
        buffers)."""
        device = h.device.type

        def described(tensors: Iterable[torch.Tensor]) -> tuple[Any, ...]:
            return tuple((tuple(t.shape), t.dtype) for t in tensors)

        return (repr(self.config), h.device, h.dtype, h.shape[0], opts, keep_logits, in_place,
                torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                get_attention_backend().name,
                tuple((t.shape[0], *t.shape[2:], t.dtype) for pair in caches for t in pair),
                described(flatten_fast(fast)),
                tuple((name, described(inner_state[name])) for name in sorted(inner_state)),
                tuple(t.data_ptr() for t in (*self.parameters(), *self.buffers())))

    def _grouped_chunks(self, h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                        opts: ForwardOptions, group: int, caches: list[KVPair] | None,
                        fast: FastWeights | None, inner_state: InnerState | None,
                        learn_last: bool, return_logits: bool, return_state: bool) -> ChunkRun:
        """:meth:`run_ttt_chunks` over groups of ``group`` sequences in turn, joined into one
        run. Sequences are independent without an outer gradient, so each group's results
        are those of its rows in a whole-batch run; only one group's fast weights, gradients
        and updates are alive at a time (and, with ``return_state``, every group's final
        state)."""
        one = replace(opts, ttt_group=None)
        runs = []
        for start in range(0, h.shape[0], group):
            rows = slice(start, start + group)
            run = self.run_ttt_chunks(
                h[rows], labels[rows], mask[rows], one,
                caches=None if caches is None else [(k[rows], v[rows]) for k, v in caches],
                fast=None if fast is None else index_fast(fast, rows),
                inner_state=None if inner_state is None else index_state(inner_state, rows),
                learn_last=learn_last, return_logits=return_logits, return_state=return_state)
            if not return_state:  # free this group's state before the next group runs
                run.caches, run.start_caches, run.fast, run.inner_state = [], [], [], {}
            runs.append(run)

        def per_chunk(lists: list[list[torch.Tensor]]) -> list[torch.Tensor]:
            return [torch.cat(parts) for parts in zip(*lists)]

        def pairs(per_run: list[list[KVPair]]) -> list[KVPair]:
            return [(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer]))
                    for layer in zip(*per_run)]

        merged = ChunkRun(
            nll=per_chunk([r.nll for r in runs]),
            chunk_losses=per_chunk([r.chunk_losses for r in runs]),
            logits=[None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]
                    for parts in zip(*(r.logits for r in runs))],
            norms=per_chunk([r.norms for r in runs]),
            hidden=None if runs[0].hidden is None else torch.cat([r.hidden for r in runs]))
        if return_state:
            merged.caches = pairs([r.caches for r in runs])
            merged.start_caches = pairs([r.start_caches for r in runs])
            merged.fast = cat_fast([r.fast for r in runs])
            merged.inner_state = cat_states([r.inner_state for r in runs])
        return merged

    def ttt_chunk(self, h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, start: int,
                  rope: tuple[torch.Tensor, torch.Tensor], caches: list[KVPair | CacheSwap],
                  fast: FastWeights, inner_state: InnerState, opts: ForwardOptions, update: bool,
                  keep_logits: bool, guard: FiniteGuard | None = None,
                  in_place: bool = False, low: FastWeights | None = None) -> tuple[Any, ...]:
        """Predict one chunk ``h [B, c, D]`` (starting at position ``start``) through the TTT
        blocks with the ``fast`` weights, then (with ``update``) take the inner optimizer's step
        on its loss. ``rope``: local tables of the ``past + c`` keys. Returns the NLL
        ``[B, c]``, the chunk loss ``[B]``, the logits (with ``keep_logits``), the caches after
        the chunk, the new fast weights and inner state, the update norms ``[B]`` and the
        chunk's output ``[B, c, D]``. A cache given as a
        :class:`~tttlm.ops.cache_swap.CacheSwap` (no outer gradient: a chunk graph's buffers)
        is read from the set its parity names and the next one written into the other; the
        caller flips the parity (the caches returned are the first set's views).

        Without an outer gradient, a sequence whose update is not finite keeps its fast weights
        and inner state (callers see it in the norms). ``guard``: a deferred
        :class:`~tttlm.ttt.finite.FiniteGuard` that may hold the previous chunk's unchecked
        update (then ``fast`` is its result, and ``guard.corrected`` says when it was not
        kept); without one, the update is checked before returning.

        ``in_place`` (no outer gradient, an inner optimizer that ``updates_in_place``): the
        update is written into ``fast``, the inner state and ``low`` for the sequences whose
        update is finite, and those are returned as the new ones; the guard is not used.
        ``low``: ``fast`` cast to the blocks' compute dtype, leaves that require grad, used
        in place of a fresh cast (see ``_inner_leaves``). Both serve weights the caller owns
        and nothing else reads: a run's own weights (:meth:`run_ttt_chunks`) and the buffers
        of a CUDA graph (:class:`~tttlm.model.cuda_graph.ChunkGraph`)."""
        mode = opts.mode
        frozen = mode is GradMode.NONE  # no outer gradient: the cache is a constant
        # No outer gradient: the inner one is taken with respect to the fast weights only. Eager
        # autograd prunes the rest by itself, compiled blocks need telling; only the blocks,
        # since autocast caches its bf16 copy of a weight only while that requires grad (the
        # tied head's would be cast again at every chunk).
        constant = (constant_parameters(self.layers[self.config.num_prefix_layers:])
                    if frozen and opts.compile_chunks else contextlib.nullcontext())
        if in_place and guard is not None and guard.pending:
            raise ValueError("ttt_chunk: settle the guard before an update in place (its "
                             "correction would not reach the weights written)")
        given = fast
        with torch.enable_grad(), constant:
            h, new_caches, fast, inner_state, leaves = self._ttt_blocks(
                h, caches, start, rope, fast, inner_state, frozen, opts.compile_chunks, guard,
                low)
            nll, logits = self.head_nll(h, labels, keep_logits, outer_graph=not frozen,
                                        lean=opts.lean_head, inner_step=update,
                                        compiled=opts.compiled)
            chunk_loss = masked_mean(nll, mask)  # [B]
            new_fast, new_state, norm = fast, inner_state, None
            if update and in_place:
                if not (frozen and self.inner_optimizer.updates_in_place):
                    raise ValueError("ttt_chunk: in_place needs GradMode.NONE and an inner "
                                     "optimizer that updates_in_place")
                with head_weight_grad_unused():
                    norm = self.inner_optimizer.step_(chunk_loss, fast, inner_state,
                                                      opts.inner_lr, self.config.inner_clip,
                                                      wrt=leaves)
                new_fast = given  # (``fast`` are its detached views: the same storage)
            elif update:
                with head_weight_grad_unused():
                    new_fast, new_state, norm = self.inner_optimizer(
                        chunk_loss, fast, inner_state, opts.inner_lr, self.config.inner_clip,
                        mode, wrt=leaves)
                if frozen:
                    new_fast, new_state = (guard or FiniteGuard(deferred=False)).watch(
                        norm, fast, inner_state, new_fast, new_state)
        if frozen:
            h = h.detach()
            nll, chunk_loss = nll.detach(), chunk_loss.detach()
            logits = logits.detach() if logits is not None else None
            new_caches = [(k.detach(), v.detach()) for k, v in new_caches]
        return nll, chunk_loss, logits, new_caches, new_fast, new_state, norm, h

    def _ttt_blocks(self, h: torch.Tensor, caches: list[KVPair | CacheSwap], start: int,
                    rope: tuple[torch.Tensor, torch.Tensor], fast: FastWeights,
                    inner_state: InnerState, frozen: bool, compiled: bool,
                    guard: FiniteGuard | None, low: FastWeights | None = None
                    ) -> tuple[torch.Tensor, list[KVPair], FastWeights, InnerState,
                               FastWeights | None]:
        """The TTT blocks over one chunk: the output, the caches after it, the fast weights
        and inner state in effect, and (when ``frozen``) the leaves the inner gradient is
        taken with respect to (``None``: the fast weights themselves; ``low`` where given).
        A pending check in ``guard`` is read once the first block is queued (the GPU has work
        while the host waits); when it fails, the blocks run again from the weights it
        kept."""
        while True:
            leaves = None
            if frozen:
                fast = [PrimeWeights(*(w.detach() for w in layer)) for layer in fast]
                leaves = self._inner_leaves(fast, h) if low is None else low
                if leaves is None:
                    fast = [PrimeWeights(*(w.requires_grad_(True) for w in layer))
                            for layer in fast]
            x, new_caches = h, []
            for j, layer in enumerate(self.ttt_layers):
                given = caches[j]
                if isinstance(given, CacheSwap):  # (a chunk graph's two buffer sets)
                    if not frozen:
                        raise ValueError("ttt_chunk: caches in two buffer sets need "
                                         "GradMode.NONE")
                    cache = ChunkKV.swapped(given, start, self.config.window, rope, compiled)
                else:
                    cache = ChunkKV(*given, start, self.config.window, rope, frozen,
                                    compiled=compiled)
                # The engine keeps fast weights in fp32 for a bf16 model: compute in h's dtype.
                weights = (leaves[j] if leaves is not None
                           else PrimeWeights(*(w.to(h.dtype) for w in fast[j])))
                x = layer(x, cache, weights, compiled=compiled)
                new_caches.append((cache.keys, cache.values))
                if j == 0 and guard is not None and guard.pending:
                    fixed = guard.settle()
                    if fixed is not None:
                        fast, inner_state = fixed
                        break
            else:
                return x, new_caches, fast, inner_state, leaves

    @staticmethod
    def compute_dtype(h: torch.Tensor) -> torch.dtype:
        """The dtype the blocks' products compute in for hidden states ``h``: autocast's
        where it is on (except for fp64 runs, which autocast leaves alone), else ``h``'s."""
        device = h.device.type
        return (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                and h.dtype != torch.float64 else h.dtype)

    def _inner_leaves(self, fast: FastWeights, h: torch.Tensor) -> FastWeights | None:
        """Without an outer gradient: the fast weights cast once to the dtype the blocks
        compute in (autocast's, else ``h``'s), as leaves to differentiate, when that is
        narrower than theirs and the inner optimizer takes them (``takes_wrt``). The products
        see the same values as autocast's own cast would give them, and the inner gradient
        arrives in that dtype: no cast pass over it (see ``inner_gradient``'s ``wrt``)."""
        compute = self.compute_dtype(h)
        if not self.inner_optimizer.takes_wrt or all(
                w.dtype == compute for layer in fast for w in layer):
            return None
        return [PrimeWeights(*(w.to(compute).requires_grad_(True) for w in layer))
                for layer in fast]

    # ------------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` then ``config.json`` to ``directory``, each durably
        (temporary file, fsync, rename, fsync of the folder).

        The weights file records the config (``tttlm_config``: its fingerprint,
        ``tttlm_config_json``: its fields), so that :meth:`from_pretrained` refuses a
        ``config.json`` edited or copied from another model, and a save cut between the two
        files.
        """
        return save_model_folder(directory, self.state_dict(), self.config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str],
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> TTTForCausalLM:
        """Load a model written by :meth:`save_pretrained` (or by ``tttlm convert``).

        Raises :class:`~tttlm.errors.UserError` when ``config.json`` is invalid or differs from
        the config the weights were saved with (naming each differing field), or when the
        weights file is damaged or holds other tensors than the config describes. Weights
        without a recorded config (older files, other tools) load with a warning.
        """
        path = Path(directory)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a tttlm model directory: expected {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (write one with save_pretrained or `tttlm convert`)")
        config = _read_config(config_file)
        where = str(device) if device is not None else "cpu"
        try:
            with safe_open(str(weights_file), framework="pt", device=where) as f:
                _check_recorded_config(config, f.metadata() or {}, config_file, weights_file)
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except SafetensorError as err:
            raise UserError(f"{weights_file} is not a readable safetensors file ({err}); it is "
                            "truncated or damaged: save or copy the model again") from None
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise UserError(f"{weights_file} does not match its config: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}; use the config.json saved with "
                            "these weights")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = [f"{k}: {tuple(v.shape)} (config says {shapes[k]})" for k, v in state.items()
                 if tuple(v.shape) != shapes[k]]
        if wrong:
            raise UserError(f"{weights_file} does not match its config: {wrong[0]}; use the "
                            "config.json saved with these weights")
        model.load_state_dict(state, assign=True)
        if dtype is not None:
            model.to(dtype)
        return model


# Keys of the config recorded in the weights file's metadata.
CONFIG_FINGERPRINT_KEY = "tttlm_config"
CONFIG_FIELDS_KEY = "tttlm_config_json"
_warned_unrecorded: set[str] = set()


def weights_metadata(config: TTTConfig) -> dict[str, str]:
    """The safetensors metadata of a model's weights file: the config's fingerprint and its
    fields, which :meth:`TTTForCausalLM.from_pretrained` compares with ``config.json``."""
    return {"format": "pt", CONFIG_FINGERPRINT_KEY: config.fingerprint(),
            CONFIG_FIELDS_KEY: json.dumps(config.to_dict(), sort_keys=True)}


def save_model_folder(directory: str | os.PathLike[str], state_dict: dict[str, torch.Tensor],
                      config: TTTConfig) -> Path:
    """The one writer of model folders: ``model.safetensors`` (recording ``config``, see
    :func:`weights_metadata`) then ``config.json``, each durably (temporary file, fsync,
    rename, fsync of the folder). :meth:`TTTForCausalLM.save_pretrained` and the trainer's
    checkpoints (with a state dict gathered from sharded ranks) both write through it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_safetensors(path / WEIGHTS_NAME, tensors, weights_metadata(config))
    atomic_write_text(path / CONFIG_NAME, config.to_json() + "\n")
    return path


def save_safetensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` made durable (:func:`tttlm.files.atomic_save`)."""
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_config(config_file: Path) -> TTTConfig:
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{config_file} is not valid JSON ({err}); restore the config.json "
                        "saved with the model") from None
    if not isinstance(data, dict):
        raise UserError(f"{config_file} holds a JSON {type(data).__name__}, not a config "
                        "object; restore the config.json saved with the model")
    try:
        return TTTConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise UserError(f"{config_file} is not a valid tttlm config: {err}") from None


def _check_recorded_config(config: TTTConfig, metadata: dict[str, str], config_file: Path,
                           weights_file: Path) -> None:
    """Refuse a ``config.json`` whose network differs from the one the weights were saved
    with (compared by fingerprint, naming the differing fields when the file records them)."""
    saved: TTTConfig | None = None
    fields = metadata.get(CONFIG_FIELDS_KEY)
    if fields is not None:
        try:
            saved = TTTConfig.from_dict(json.loads(fields))
        except (TypeError, ValueError):  # a newer or damaged record: fall back to the hash
            saved = None
    fix = (f"restore {CONFIG_NAME} to the values the weights were saved with (or load them "
           "with those and save again with save_pretrained)")
    if saved is not None:
        if saved.fingerprint() == config.fingerprint():
            return
        now, then = config.to_dict(), saved.to_dict()
        diffs = [f"{k}={_show(now, k)} (saved with {_show(then, k)})"
                 for k in sorted(set(now) | set(then)) if _show(now, k) != _show(then, k)]
        raise UserError(f"{weights_file} does not match its config {config_file}: "
                        f"{CONFIG_NAME} has {', '.join(diffs)}; {fix}")
    recorded = metadata.get(CONFIG_FINGERPRINT_KEY)
    if recorded is not None:
        if recorded == config.fingerprint():
            return
        raise UserError(f"{weights_file} does not match its config {config_file}: the weights "
                        f"were saved with config fingerprint {recorded}, {CONFIG_NAME} gives "
                        f"{config.fingerprint()} (the file does not record which fields "
                        f"differ); {fix}")
    key = str(weights_file.resolve())
    if key not in _warned_unrecorded:
        _warned_unrecorded.add(key)
        warnings.warn(f"{weights_file} does not record the config it was saved with (an older "
                      f"tttlm or another tool wrote it), so {CONFIG_NAME} cannot be checked "
                      "against it; save the model again with save_pretrained to record it",
                      UserWarning, stacklevel=3)


def _show(fields: dict[str, Any], key: str) -> str:
    return json.dumps(fields[key]) if key in fields else "missing"


def _unshifted(input_ids: torch.Tensor, labels: torch.Tensor,
               ignored: torch.Tensor) -> torch.Tensor:
    """Whether ``labels`` repeat ``input_ids`` at every counted position (a bool scalar on the
    device), in a batch whose inputs change somewhere: there shifted labels cannot equal the
    inputs, so the caller passed ``labels=input_ids``."""
    same = ((labels == input_ids) | ignored).all()
    varied = (input_ids[:, 1:] != input_ids[:, :-1]).any()
    return same & varied & (~ignored).any()
