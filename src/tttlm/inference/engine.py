"""Prefill, streaming decode with test-time updates, and generation.

The engine reproduces the training forward (``TTTForCausalLM(..., ttt=True)``, METHOD.md §3)
one token at a time:

* prefix blocks: sliding-window attention over a ring of the last ``k`` keys (``full``: all
  keys), RoPE at absolute positions, computed exactly as the training forward computes them.
  Angles are fp32 (``pos * θ^(-2i/d)``), so far past the trained lengths (~1e6 tokens) their
  rounding grows (~pos·6e-8 rad), as it would in a training forward that long; the TTT blocks
  use local positions and are unaffected. Relative positions would bound that error at any
  length, at the price of re-rotating the cache every token and of no longer reproducing
  training bit for bit; equivalence with training was preferred;
* TTT blocks: attention over the cache as it was at the start of the current chunk plus the
  chunk's own keys, RoPE at the *local* positions the training forward uses (the chunk's keys at
  ``k .. k+b-1``), the MLPs with the sequence's current fast weights;
* the inner step of a chunk needs the chunk's last target, the first token of the next chunk.
  It therefore runs when that token arrives, before the token is processed: the TTT blocks are
  re-run over the chunk (from the stored prefix outputs and the cache at the chunk's start) with
  autograd, and one clipped SGD step updates that sequence's fast weights. Every token is thus
  predicted with exactly the fast weights the training forward would use.

Prefill reads a prompt in pieces that end at chunk boundaries (so memory stays bounded for any
prompt length) and learns from each full chunk once its last target is read. Sequences of a
batch are independent. Prompts of equal length (and equal position in their chunk) are
prefilled as one batch; otherwise one by one, then decoded together. While decoding, a
sequence's inner step runs at the step where its own chunk completes (sequences completing at
the same step are updated together), so with ragged prompts a batch pays several inner steps
per ``b`` tokens, each for a subset of the batch, instead of one for all.

Everything runs under ``torch.inference_mode`` except the inner step, which leaves it to take
its own gradient; callers may wrap the engine in ``no_grad``/``inference_mode`` or not.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from tttlm.config import MAX_INNER_LR, Variant, check_number
from tttlm.errors import UserError
from tttlm.inference.sampling import check_sampling, sample
from tttlm.inference.state import State, weights_digest
from tttlm.model.cache import MixerStep, RingKV, RingStep, Rows, TTTRing, TTTStep, rope_slots
from tttlm.model.cuda_graph import can_capture, capture
from tttlm.model.layers import Block
from tttlm.model.model import TTTForCausalLM
from tttlm.ops.rope import config_rope_angles
from tttlm.ttt.base import InnerState, index_state, map_state
from tttlm.ttt.fast import FastWeights, PrimeWeights, flatten_fast, unflatten_fast

Prompts = torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[int]]

def _check_inner_lr(lr: object, name: str) -> float:
    """η as the config validates it: finite, >= 0, at most :data:`MAX_INNER_LR`."""
    if isinstance(lr, Real) and not isinstance(lr, bool):
        lr = float(lr)  # NumPy scalars
    try:
        check_number(name, lr, minimum=0, maximum=MAX_INNER_LR,
                     hint=f"pass an inner_lr in [0, {MAX_INNER_LR:g}] (0 learns nothing; the "
                          "official value is 1.0)")
    except ValueError as err:
        raise UserError(str(err)) from None
    return float(lr)  # type: ignore[arg-type]


class _Control(NamedTuple):
    """Per-sequence counters on the device: tokens read, offset in the pending chunk, keys
    in the TTT cache at the chunk's start; ``rows`` the sequences that advance (None: all)."""

    lengths: torch.Tensor  # [B]
    offset: torch.Tensor  # [B]
    past: torch.Tensor  # [B]
    rows: torch.Tensor | None  # [R]


def _buffers(state: State) -> tuple[tuple[int, tuple[int, ...], torch.dtype], ...]:
    """Where a state's tensors are, their shapes and dtypes: what a captured graph was made
    for (a graph keeps no tensor alive, so another state may come to lie at the same
    addresses; with the same shapes and dtypes it is served right; rings are in the dtype
    the state was made under)."""
    tensors = [*state._tensors().values(), *state.ttt_keys_rope, *(state.fast_cast or [])]
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors)


def _powers_of_two(n: int) -> list[int]:
    """``n`` as a sum of distinct powers of two, largest first."""
    return [1 << i for i in reversed(range(n.bit_length())) if n >> i & 1]


class _ForwardGraph:
    """``Engine._compute`` of ``n`` tokens for every sequence of one state, captured: a
    decoding step (n = 1) or a whole chunk of a prompt (n = b).

    The graph reads the tokens and counters from static buffers and writes the state's
    buffers in place; it is valid while those buffers stay where they were captured.
    """

    def __init__(self, engine: Engine, state: State, tokens: torch.Tensor, ttt_forward: bool,
                 want_logits: bool) -> None:
        B, n, device = state.batch_size, tokens.shape[1], state.device
        self.engine = engine
        self.tokens = torch.zeros(B, n, dtype=torch.long, device=device)
        self.counters = torch.zeros(3, B, dtype=torch.long, device=device)
        self._load(state, tokens)
        ctl = _Control(self.counters[0], self.counters[1], self.counters[2], None)

        def run() -> torch.Tensor | None:
            return engine._compute(state, self.tokens, ctl, ttt_forward, want_logits, None)

        def warm() -> None:
            # The warm-up performs the coming call's writes. The replay repeats those of the
            # caches with the same values; a recurrent block's state, though, is advanced
            # from itself, so it is put back.
            kept = [t.clone() for t in state.mixers]
            run()
            for t, old in zip(state.mixers, kept):
                t.copy_(old)

        self._replay = capture(run, warm, device)

    def _load(self, state: State, tokens: torch.Tensor) -> None:
        ctl = self.engine._control(state, None, tokens.shape[1])
        self.tokens.copy_(tokens)
        self.counters.copy_(torch.stack((ctl.lengths, ctl.offset, ctl.past)))

    def replay(self, state: State, tokens: torch.Tensor) -> torch.Tensor | None:
        self._load(state, tokens)
        return self._replay()


class _LearnGraph:
    """The inner step of every sequence of one state once their TTT caches are full (the
    steady state: every chunk's step has the same shapes), captured. Its warm-up computes
    without writing (the step is not idempotent: it reads the fast weights it updates)."""

    def __init__(self, engine: Engine, state: State, last_targets: torch.Tensor) -> None:
        assert engine.window is not None
        self.targets = last_targets.clone()
        # The chunk's absolute start enters only the attention mask, through differences of
        # positions: the value captured serves every later chunk.
        start = engine.chunk * state.chunks_done[0]

        def run(write: bool) -> torch.Tensor:
            return engine._learn_rows(state, slice(None), engine.window, start, self.targets,
                                      write)

        self._replay = capture(lambda: run(True), lambda: run(False), state.device)

    def replay(self, last_targets: torch.Tensor) -> torch.Tensor:
        self.targets.copy_(last_targets)
        return self._replay()


@dataclass
class Generation:
    """What :meth:`Engine.generate` returns.

    Attributes:
        tokens: the new tokens of every sequence (the stop token included when one was hit).
        finish_reasons: ``"stop"`` (a stop token was sampled) or ``"length"`` per sequence.
        state: the state after reading the prompt and every new token, ready to continue.
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    state: State = field(repr=False)


class TokenStream:
    """Iterator over generated tokens: each item is ``[B]`` ints, ``-1`` for finished rows.

    After the iteration ``tokens``, ``finish_reasons`` and ``state`` hold the results.
    """

    def __init__(self, engine: Engine, logits: torch.Tensor, state: State, max_new_tokens: int,
                 temperature: float, top_k: int | None, top_p: float | None,
                 stop: set[int], seed: int | None) -> None:
        self.state = state
        self.tokens: list[list[int]] = [[] for _ in range(state.batch_size)]
        self.finish_reasons = ["length"] * state.batch_size
        self._it = self._run(engine, logits, max_new_tokens, temperature, top_k, top_p, stop,
                             seed)

    def __iter__(self) -> Iterator[list[int]]:
        return self._it

    def __next__(self) -> list[int]:
        return next(self._it)

    def _run(self, engine: Engine, logits: torch.Tensor, max_new_tokens: int,
             temperature: float, top_k: int | None, top_p: float | None, stop: set[int],
             seed: int | None) -> Iterator[list[int]]:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(seed)
        active = list(range(self.state.batch_size))
        for _ in range(max_new_tokens):
            if not active:
                return
            picked = sample(logits, temperature, top_k, top_p, generator).tolist()
            out = [-1] * self.state.batch_size
            for r in active:
                out[r] = picked[r]
                self.tokens[r].append(picked[r])
            yield out
            # Every sampled token is read into the state (the stop token too), so the state
            # always holds the whole conversation and a later prompt continues it.
            logits, _ = engine.step(self.state, torch.tensor(picked), active=active)
            for r in active:
                if picked[r] in stop:
                    self.finish_reasons[r] = "stop"
            active = [r for r in active if self.finish_reasons[r] != "stop"]


class Engine:
    """Prefill and decode a :class:`TTTForCausalLM` (any variant) with bounded memory.

    Args:
        model: the model; its weights are used as they are (move/cast the model first).
        ttt: learn at test time (default: True for ``e2e``). ``False`` keeps the initial
            fast weights ("pretrain mode").
        inner_lr: η of the inner step (default ``config.inner_lr``).
        ignore_bos_targets: like the official data pipeline, a target equal to BOS does not
            count in a chunk's inner loss (matches training with ``labels == -100`` there).
        cuda_graphs: on a CUDA device, replay the steps of a whole batch that repeat with the
            same shapes as captured CUDA graphs: the single-token decoding step, the pieces of
            a prompt read into a state that has read before (a session's next turn, a recalled
            quote: whole chunks, the rest as pieces whose lengths are powers of two), and a
            chunk's inner step once the TTT caches are full. A state's graphs are captured for
            its buffers (again when they change: another state, a grown cache), at their
            first use, except while a state read once is read (a fresh state's first prompt,
            a ragged batch's row: at their second). A fresh prompt longer than the window by
            more than two chunks runs the prefix blocks over the whole prompt, then learns its
            chunks one by one as decoding does (instead of the training forward's chunk
            loop), so that the inner step replays too (equal to rounding). At most about
            log2(chunk) + 3 graphs per state (a piece length each, a whole chunk without the
            TTT blocks, the inner step), each with its own memory pool. (Without them, a
            prompt's chunk loop is the model's, which takes its own chunk graph where
            ``model.graph_chunks`` says: by default one sequence on a GPU with at least 32
            chunks over full caches.)
    """

    def __init__(self, model: TTTForCausalLM, *, ttt: bool | None = None,
                 inner_lr: float | None = None, ignore_bos_targets: bool = True,
                 cuda_graphs: bool = False) -> None:
        config = model.config
        self.model = model
        self.config = config
        self.is_e2e = config.variant is Variant.E2E
        self.ttt = self.is_e2e if ttt is None else ttt
        if self.ttt and not self.is_e2e:
            raise ValueError(f"ttt=True needs an e2e model; this one is {config.variant.value!r}")
        self.inner_lr = _check_inner_lr(config.inner_lr if inner_lr is None else inner_lr,
                                        "config.inner_lr" if inner_lr is None else "inner_lr")
        self._warned_skip = False
        self.ignore_bos_targets = ignore_bos_targets
        self.window = config.window if config.uses_window else None
        # Per prefix block: its window (None: full attention, a cache that grows).
        self.layer_windows = [config.layer_window(i) for i in range(config.num_prefix_layers)]
        # Recurrent prefix blocks (TTT-KVB, Gated DeltaNet) -> where their tensors start in
        # State.mixers.
        self.mixer_slots: dict[int, slice] = {}
        at = 0
        for i in range(config.num_prefix_layers):
            mixer = model.layers[i].recurrent
            if mixer is not None:
                n = len(mixer.state_shapes())
                self.mixer_slots[i] = slice(at, at + n)
                at += n
        self.chunk = config.chunk_size
        self.prefix: list[Block] = model.prefix_layers
        self.ttt_blocks: list[Block] = model.ttt_layers
        self._fingerprint = config.fingerprint()
        self._digest = weights_digest(model)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
        self.cuda_graphs = cuda_graphs
        # The captured graphs of one state (batch size, buffer addresses and shapes, and the
        # engine's settings), by computation; computations seen once, eagerly, for that state.
        self._graphs: dict[tuple, Any] = {}
        self._graphs_for: tuple | None = None
        self._seen: set[tuple] = set()
        # While a state is read that will not be read again as it is (a fresh state's first
        # prompt, a ragged batch's row): graphs at their second use.
        self._once = False

    # --------------------------------------------------------------------------- helpers
    @property
    def _param(self) -> torch.Tensor:
        return self.model.embed.weight

    @property
    def _fast_dtype(self) -> torch.dtype:
        return torch.float64 if self._param.dtype == torch.float64 else torch.float32

    def _cache_dtype(self) -> torch.dtype:
        """The dtype of a new state's key/value rings: the one the blocks compute in
        (autocast's where it is on, as the model's own prefill keeps its caches). Attention
        reads the keys and values in that dtype anyway, so the results are the same to the
        last bit as with rings in the weights' dtype, at half their bytes under bf16 autocast
        of fp32 weights (3b at 8K: 6.8 GB of rings a sequence in fp32)."""
        return self.model.compute_dtype(self._param)

    def _local_rope(self) -> tuple[torch.Tensor, ...]:
        """RoPE tables of the TTT blocks' local positions ``0 .. k+b-1`` (built once)."""
        key = (self._param.device, self._param.dtype)
        if key not in self._tables:
            assert self.window is not None
            pos = torch.arange(self.window + self.chunk, device=self._param.device)
            self._tables[key] = config_rope_angles(pos, self.config, self._param.dtype)
        return self._tables[key]

    def _check_tokens(self, tokens: torch.Tensor, what: str) -> None:
        if tokens.numel() == 0:
            raise UserError(f"{what} is empty; give at least one token")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise UserError(f"{what} contains token id {lo if lo < 0 else hi} outside the "
                            f"model's vocabulary [0, {self.config.vocab_size}); encode with "
                            "the model's tokenizer")

    def _check_state(self, state: State) -> None:
        if state.config_fingerprint != self._fingerprint:
            raise UserError("this state belongs to a model with another config; a state only "
                            "continues on the model that made it")
        if state.weights_digest != self._digest:
            raise UserError(f"this state belongs to a model with other weights (digest "
                            f"{state.weights_digest or 'none'}, this engine's model "
                            f"{self._digest}); a state only continues on the model that made "
                            "it (State.load(..., check_weights=False) takes one over)")

    # ----------------------------------------------------------------------------- state
    def new_state(self, batch: int = 1) -> State:
        """The state of ``batch`` sequences that have read nothing yet; its key/value rings in
        the dtype the blocks compute in here (under bf16 autocast: bf16)."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise UserError(f"batch={batch!r} must be a positive integer (one state row per "
                            "sequence)")
        config, p = self.config, self._param
        ring_dtype = self._cache_dtype()
        H, d = config.num_kv_heads, config.head_dim  # caches keep only the KV heads
        # (a TTT-KVB block attends to nothing: an empty ring keeps the lists aligned)
        caps = [0 if i in self.mixer_slots else self.chunk if w is None else w + self.chunk
                for i, w in enumerate(self.layer_windows)]

        def zeros(slots: int) -> torch.Tensor:
            return torch.zeros(batch, H, slots, d, device=p.device, dtype=ring_dtype)

        state = State(lengths=[0] * batch, chunks_done=[0] * batch,
                      prefix_keys=[zeros(c) for c in caps],
                      prefix_values=[zeros(c) for c in caps],
                      config_fingerprint=self._fingerprint, weights_digest=self._digest)
        for i in self.mixer_slots:
            mixer = self.prefix[i].recurrent
            assert mixer is not None
            state.mixers += mixer.initial_state(batch, self._fast_dtype)
        if self.is_e2e:
            assert self.window is not None
            slots = self.window + self.chunk
            state.ttt_keys = [zeros(slots) for _ in self.ttt_blocks]
            state.ttt_values = [zeros(slots) for _ in self.ttt_blocks]
            state.ttt_keys_rope = [zeros(slots) for _ in self.ttt_blocks]
            state.pending_hidden = torch.zeros(batch, self.chunk, config.hidden_size,
                                               device=p.device, dtype=p.dtype)
            state.pending_tokens = torch.zeros(batch, self.chunk, device=p.device,
                                               dtype=torch.long)
            state.fast = [w.detach().to(self._fast_dtype).unsqueeze(0)
                          .repeat(batch, *([1] * w.dim()))
                          for block in self.ttt_blocks for w in block.prime.weights()]
            state.inner = self.model.inner_optimizer.init_state(unflatten_fast(state.fast))
        return state

    # ----------------------------------------------------------------------- public API
    def prefill(self, input_ids: Prompts,
                state: State | None = None) -> tuple[torch.Tensor, State]:
        """Read prompts and return the logits of each prompt's last token ``[B, V]``.

        ``input_ids`` is a ``[B, T]`` tensor or a list of B 1-D token sequences of any
        lengths. With ``state`` the prompts continue those sequences (a session); without, a
        new state is made. The state is updated in place and returned.
        """
        prompts = self._as_prompts(input_ids)
        with torch.inference_mode():
            if state is None:
                state = self.new_state(len(prompts))
            self._check_state(state)
            if state.batch_size != len(prompts):
                raise ValueError(f"{len(prompts)} prompts for a state of "
                                 f"{state.batch_size} sequences")
            same = (len({len(p) for p in prompts}) == 1
                    and len({self._pending(state, r) for r in range(len(prompts))}) == 1)
            if same:
                # One batched pass: all sequences cross chunk boundaries at the same tokens.
                logits = self._extend(state, torch.stack(prompts))
            else:
                parts, rows = [], []
                for r, prompt in enumerate(prompts):
                    sub = state.select([r])  # (new tensors, read once)
                    with self._read_once():
                        parts.append(self._extend(sub, prompt[None]))
                    rows.append(sub)
                logits = torch.cat(parts)
                # Update the caller's object in place, as every other path does.
                state.__dict__.update(State.stack(rows).__dict__)
        return logits.clone(), state

    def step(self, state: State, next_tokens: torch.Tensor | Sequence[int],
             active: Sequence[int] | None = None) -> tuple[torch.Tensor, State]:
        """Read one token per sequence (``next_tokens [B]``); return the next logits ``[B, V]``.

        A sequence whose pending chunk is full first takes the chunk's inner step (its last
        target is ``next_tokens``). With ``active``, only those rows are read; the others'
        state is left unchanged (their logits are meaningless).
        """
        with torch.inference_mode():
            self._check_state(state)
            tokens = torch.as_tensor(next_tokens, device=state.device).long().reshape(-1)
            if tokens.shape[0] != state.batch_size:
                raise ValueError(f"next_tokens has {tokens.shape[0]} tokens for a state of "
                                 f"{state.batch_size} sequences: give one per sequence")
            rows = list(range(state.batch_size)) if active is None else list(active)
            self._check_tokens(tokens[rows], "next_tokens")
            if self.is_e2e:
                full = [r for r in rows if self._pending(state, r) == self.chunk]
                if full:
                    self.finish_chunk(state, full, tokens[full])
            logits = self._forward(state, tokens[:, None], rows, ttt_forward=True,
                                   want_logits=True)
        assert logits is not None
        return logits.clone(), state

    def stream(self, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None,
               stop: int | Sequence[int] | None = None, seed: int | None = None,
               state: State | None = None) -> TokenStream:
        """Prefill, then yield sampled tokens one step at a time (see :class:`TokenStream`).

        ``temperature == 0`` is greedy decoding; ``stop`` token ids end a sequence (default:
        the config's EOS; ``()`` for none). ``seed`` makes sampling reproducible.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        check_sampling(temperature, top_k, top_p)
        stops = {self.config.eos_token_id} if stop is None else (
            {stop} if isinstance(stop, int) else set(stop))
        logits, state = self.prefill(prompts, state)
        return TokenStream(self, logits, state, max_new_tokens, temperature, top_k, top_p,
                           stops, seed)

    def generate(self, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 stop: int | Sequence[int] | None = None, seed: int | None = None,
                 state: State | None = None) -> Generation:
        """Generate up to ``max_new_tokens`` per prompt; arguments as :meth:`stream`."""
        stream = self.stream(prompts, max_new_tokens, temperature, top_k, top_p, stop, seed,
                             state)
        for _ in stream:
            pass
        return Generation(stream.tokens, stream.finish_reasons, stream.state)

    # -------------------------------------------------------------------------- internals
    def _as_prompts(self, input_ids: Prompts) -> list[torch.Tensor]:
        device = self._param.device
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            if input_ids.dim() != 2:
                raise UserError(f"input_ids must be [batch, length], got "
                                f"{tuple(input_ids.shape)}; add or drop a batch axis")
            if input_ids.is_floating_point():
                raise UserError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
            prompts = list(input_ids.to(device).long())
        else:
            prompts = [torch.as_tensor(p, device=device).long().reshape(-1) for p in input_ids]
        if not prompts:
            raise UserError("no prompts given (a batch of zero sequences); give at least one "
                            "prompt of at least one token")
        for i, p in enumerate(prompts):
            self._check_tokens(p, f"prompt {i}")
        return prompts

    def _pending(self, state: State, r: int) -> int:
        """Tokens of sequence r read since its last learned chunk (b when a chunk waits)."""
        if not self.is_e2e:
            return state.lengths[r] % self.chunk
        return state.lengths[r] - self.chunk * state.chunks_done[r]

    def _extend(self, state: State, tokens: torch.Tensor) -> torch.Tensor:
        """Read ``tokens [B, T]`` into sequences that share their position within a chunk."""
        T, b = tokens.shape[1], self.chunk
        if not any(state.lengths):
            return self._prefill_fresh(state, tokens)
        rows = list(range(state.batch_size))
        t, logits = 0, None
        while t < T:
            pending = self._pending(state, 0)
            if self.is_e2e and pending == b:
                self.finish_chunk(state, rows, tokens[:, t])
                pending = 0
            n = min(b - pending, T - t)
            last = t + n == T
            # A chunk that ends inside the prompt is learned from when the next piece starts;
            # that step runs the TTT blocks over the chunk anyway, so skip them here.
            learned_later = self.ttt and not last and pending + n == b
            logits = self._forward(state, tokens[:, t:t + n], rows,
                                   ttt_forward=not learned_later, want_logits=last)
            t += n
        assert logits is not None
        return logits

    def _prefill_fresh(self, state: State, tokens: torch.Tensor) -> torch.Tensor:
        """Read ``tokens [B, T]`` into sequences that have read nothing: the training forward
        itself (:meth:`TTTForCausalLM.run_blocks` and :meth:`~TTTForCausalLM.run_ttt_chunks`),
        the prefix blocks over the whole prompt filling the decoding caches as they go, every
        chunk but the last learned from; the last (its last target is not known yet) becomes
        the pending chunk."""
        model, B, T = self.model, tokens.shape[0], tokens.shape[1]
        if self.grows:
            self._grow(state, T)
        rings = [self._mixer_state(state, i) if i in self.mixer_slots else ring
                 for i, ring in enumerate(zip(state.prefix_keys, state.prefix_values))]
        h = model.run_blocks(model.embed(tokens), self.prefix, rings)  # [B, T, D]
        state.lengths = [T] * B
        if (self.ttt and self.window is not None and self._captures(state)
                and T - self.window > 2 * self.chunk):
            # (a prompt with at least two chunks learned once the caches are full: the second
            # of them on is replayed; a shorter one is better read by the training forward)
            with self._read_once():
                return self._learn_chunks(state, h, tokens)
        if not self.is_e2e:
            _, logits = model.head_nll(h[:, -1:], None, True)
            assert logits is not None
            return logits[:, 0]
        assert self.window is not None and state.pending_hidden is not None
        assert state.pending_tokens is not None
        W = self.window
        # The inner steps need autograd, which inference tensors refuse: copies leave it.
        with torch.inference_mode(False), torch.no_grad():
            labels = torch.zeros_like(tokens).clone()
            labels[:, :-1] = tokens[:, 1:]
            counted = torch.ones_like(labels, dtype=torch.bool)
            if self.ignore_bos_targets:
                counted = labels != self.config.bos_token_id
            counted[:, -1] = False  # the last target is the next token, not read yet
            opts = model.options(ttt=self.ttt, inner_lr=self.inner_lr)
            run = model.run_ttt_chunks(
                h.clone(), labels, counted, opts,
                fast=unflatten_fast([w.clone() for w in state.fast]),
                inner_state=map_state(torch.clone, state.inner))
            assert run.hidden is not None
            _, logits = model.head_nll(run.hidden[:, -1:], None, True)
        assert logits is not None
        start = self.chunk * (len(run.nll) - 1)
        c = T - start
        state.chunks_done = [len(run.nll) - 1] * B
        for w, new in zip(state.fast, flatten_fast(run.fast)):
            w.copy_(new)
        for key, tensors in run.inner_state.items():
            for t, new in zip(state.inner[key], tensors):
                t.copy_(new)
        if run.norms:
            self._count_skipped(state, list(range(B)), torch.stack(run.norms, 1))
        state.pending_hidden[:, :c] = h[:, start:].to(state.pending_hidden.dtype)
        state.pending_tokens[:, :c] = tokens[:, start:]
        for j, ((k0, v0), (k1, v1)) in enumerate(zip(run.start_caches, run.caches)):
            past = k0.shape[1]
            # Slots W-past .. W-1: the cache at the pending chunk's start; W ..: its own keys.
            for buf, before, after in ((state.ttt_keys[j], k0, k1),
                                       (state.ttt_values[j], v0, v1)):
                buf[:, :, W - past:W] = before.transpose(1, 2).to(buf.dtype)
                buf[:, :, W:W + c] = after[:, -c:].transpose(1, 2).to(buf.dtype)
            state.ttt_keys_rope[j].copy_(rope_slots(state.ttt_keys[j], self.config))
        return logits[:, 0]

    def _learn_chunks(self, state: State, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`_prefill_fresh`'s TTT part as decoding takes it (for CUDA graphs, which
        the training forward's chunk loop is not): each full chunk but the last learned from
        through :meth:`finish_chunk` (captured once the TTT caches are full), the last one
        read as the pending chunk. The same function of the tokens as the training forward
        (to rounding: the sums run in another order)."""
        assert state.pending_hidden is not None and state.pending_tokens is not None
        B, T, b = tokens.shape[0], tokens.shape[1], self.chunk
        rows = list(range(B))
        last = b * ((T - 1) // b)  # the pending chunk's first token
        for start in range(0, last, b):
            state.pending_hidden[:, :b] = h[:, start:start + b].to(state.pending_hidden.dtype)
            state.pending_tokens[:, :b] = tokens[:, start:start + b]
            self.finish_chunk(state, rows, tokens[:, start + b])
        state.lengths = [last] * B
        m = T - last
        ctl = self._control(state, None, m)
        logits = self._compute_ttt(state, h[:, last:], tokens[:, last:], ctl,
                                   Rows(None, B, state.device), True, True)
        state.lengths = [T] * B
        assert logits is not None
        return logits

    def _mixer_state(self, state: State, layer: int) -> tuple[torch.Tensor, ...]:
        """The decoding tensors of recurrent block ``layer`` (a prefix-block index)."""
        return tuple(state.mixers[self.mixer_slots[layer]])

    @property
    def grows(self) -> bool:
        """Whether some block's decoding cache grows with the context (full attention)."""
        return None in self.layer_windows

    def _grow(self, state: State, needed: int) -> None:
        """Full-attention blocks: double their caches until ``needed`` slots fit."""
        full = [i for i, w in enumerate(self.layer_windows) if w is None]
        cap = state.prefix_keys[full[0]].shape[2]
        if needed <= cap:
            return
        new = max(needed, 2 * cap)
        pad = (0, 0, 0, new - cap)
        for i in full:
            state.prefix_keys[i] = F.pad(state.prefix_keys[i], pad)
            state.prefix_values[i] = F.pad(state.prefix_values[i], pad)

    def _control(self, state: State, rows: list[int] | None, n: int) -> _Control:
        """Device copies of the per-sequence counters a forward over n new tokens needs."""
        device = state.device
        # Rows left out may sit on a full chunk; clamp so their (discarded) work stays in
        # bounds.
        offset = [min(self._pending(state, r), self.chunk - n) for r in range(state.batch_size)]
        past = [min(self.window or 0, self.chunk * c) for c in state.chunks_done]
        counters = torch.tensor([state.lengths, offset, past], device=device)  # one copy
        sel = None if rows is None else torch.tensor(rows, device=device)
        return _Control(counters[0], counters[1], counters[2], sel)

    @contextlib.contextmanager
    def _read_once(self) -> Iterator[None]:
        """Mark the state read inside as one that is read once: graphs at second use."""
        before, self._once = self._once, True
        try:
            yield
        finally:
            self._once = before

    def _captures(self, state: State) -> bool:
        """Whether computations on ``state`` run as captured CUDA graphs."""
        return self.cuda_graphs and can_capture(state.device)

    def _graph(self, state: State, key: tuple, make: Callable[[], Any]) -> Any:
        """The captured graph ``key`` of ``state`` (``make`` captures it), or None where the
        computation runs eagerly: no CUDA graphs, or its first use while a state that is
        read once is read (a fresh state's first prompt, a ragged batch's row: not worth a
        capture for one call; a session's state read again is)."""
        if not self._captures(state):
            return None
        # (η and the target rule are constants of a captured inner step)
        owner = (state.batch_size, _buffers(state), self.inner_lr, self.ignore_bos_targets)
        if owner != self._graphs_for:
            self._graphs.clear()  # free the old graphs' memory pools first
            self._seen.clear()
            self._graphs_for = owner
        if key not in self._graphs:
            if self._once and key not in self._seen:
                self._seen.add(key)
                return None
            self._graphs[key] = make()
        return self._graphs[key]

    def _forward(self, state: State, tokens: torch.Tensor, rows: list[int], ttt_forward: bool,
                 want_logits: bool) -> torch.Tensor | None:
        """Read ``tokens [B, n]``: every row in ``rows`` advances by n tokens, all within its
        pending chunk. Returns the logits of the last new token ``[B, V]`` if asked."""
        n = tokens.shape[1]
        if self.grows:
            self._grow(state, max(state.lengths) + n)
        every = len(rows) == state.batch_size
        power = n & (n - 1) == 0
        if every and not power and n != self.chunk and self._captures(state):
            # Any other length is read as pieces whose lengths are powers of two (85 = 64 +
            # 16 + 4 + 1): a few graphs that later reads reuse, not one per length. The same
            # function of the tokens, summed in another order (rounding differs).
            logits, t = None, 0
            for size in _powers_of_two(n):
                logits = self._forward(state, tokens[:, t:t + size], rows, ttt_forward,
                                       want_logits and t + size == n)
                t += size
            return logits
        graph = None
        if every and (power or n == self.chunk):
            # (the last token's logits cost one row of the head: a graph always computes
            # them, so that there is one graph per length and TTT forward, not two)
            graph = self._graph(state, ("forward", n, ttt_forward),
                                lambda: _ForwardGraph(self, state, tokens, ttt_forward, True))
        if graph is not None:
            logits = graph.replay(state, tokens)
            logits = logits if want_logits else None
        else:
            ctl = self._control(state, None if every else rows, n)
            # Full attention: slots past the longest sequence hold nothing yet.
            used = max(state.lengths) + n if self.grows else None
            logits = self._compute(state, tokens, ctl, ttt_forward, want_logits, used)
        for r in rows:
            state.lengths[r] += n
        return logits

    def _compute(self, state: State, tokens: torch.Tensor, ctl: _Control, ttt_forward: bool,
                 want_logits: bool, used: int | None) -> torch.Tensor | None:
        """The device work of :meth:`_forward`: no host synchronisation, state written in
        place, so that a CUDA graph can capture it. The blocks run their one forward over
        decoding caches (:mod:`tttlm.model.cache`)."""
        config, device = self.config, tokens.device
        B, n = tokens.shape
        # Rows outside ctl.rows are computed as if they advanced, but nothing of theirs is kept.
        rows = Rows(ctl.rows, B, device)
        h = self.model.embed(tokens)  # [B, n, D]
        rings: dict[int | None, RingStep] = {}  # one per window (hybrid: two)
        for i, layer in enumerate(self.prefix):
            if i in self.mixer_slots:
                h = layer(h, MixerStep(self._mixer_state(state, i), ctl.offset, rows))
                continue
            w = self.layer_windows[i]
            if w not in rings:
                rings[w] = RingStep.build(ctl.lengths, n, state.prefix_keys[i].shape[2], w,
                                          used if w is None else None, rows, config,
                                          self._param.dtype)
            h = layer(h, RingKV(state.prefix_keys[i], state.prefix_values[i], rings[w]))
        return self._compute_ttt(state, h, tokens, ctl, rows, ttt_forward, want_logits)

    def _compute_ttt(self, state: State, h: torch.Tensor, tokens: torch.Tensor, ctl: _Control,
                     rows: Rows, ttt_forward: bool, want_logits: bool) -> torch.Tensor | None:
        """The rest of :meth:`_compute` from the prefix blocks' output ``h [B, n, D]``: into
        the pending chunk, through the TTT blocks, and the head."""
        n, device = tokens.shape[1], tokens.device
        if self.is_e2e:
            assert state.pending_hidden is not None and state.pending_tokens is not None
            assert self.window is not None
            at = rows.keep(ctl.offset[:, None] + torch.arange(n, device=device))  # [R, n]
            state.pending_hidden[rows.column, at] = rows.keep(h).to(state.pending_hidden.dtype)
            state.pending_tokens[rows.column, at] = rows.keep(tokens)
            if ttt_forward:
                step = TTTStep.build(ctl.offset, ctl.past, n, self.window, self.chunk,
                                     self._local_rope(), rows)
                for j, layer in enumerate(self.ttt_blocks):
                    cache = TTTRing(state.ttt_keys[j], state.ttt_keys_rope[j],
                                    state.ttt_values[j], step)
                    h = layer(h, cache, self._fast_weights(state, j, h.dtype))
        if not want_logits:
            return None
        _, logits = self.model.head_nll(h[:, -1:], None, True)
        assert logits is not None
        return logits[:, 0]

    def _fast_weights(self, state: State, j: int, dtype: torch.dtype) -> PrimeWeights:
        """TTT block j's fast weights in the compute dtype; the cast copy (bf16 models keep
        fp32 fast weights) is made once per chunk, not once per token."""
        if state.fast[0].dtype == dtype:
            w = state.fast
        else:
            if state.fast_cast is None or state.fast_cast[0].dtype != dtype:
                state.fast_cast = [t.to(dtype) for t in state.fast]
            w = state.fast_cast
        return unflatten_fast(w)[j]

    def finish_chunk(self, state: State, rows: list[int], last_targets: torch.Tensor) -> None:
        """(Called by :meth:`step` and :meth:`prefill`; public for benchmarks that time the
        inner step alone.) Learn from the full pending chunk of ``rows`` (whose last target is
        ``last_targets [R]``), then make the chunk part of the cache."""
        assert self.window is not None
        W, b, device = self.window, self.chunk, state.device
        if not self.ttt:
            idx = torch.tensor(rows, device=device)
            for j in range(len(self.ttt_blocks)):
                # The cache after the chunk is the last W keys of (cache ⊕ chunk): shift by b.
                for buf in (state.ttt_keys[j], state.ttt_values[j]):
                    buf[idx, :, :W] = buf[idx, :, b:].clone()
                state.ttt_keys_rope[j][idx, :, :W] = rope_slots(state.ttt_keys[j][idx, :, :W],
                                                                self.config)
        else:
            # Sequences early in their context hold caches of different lengths: one chunk
            # forward per length (the training forward's caches have one length per batch).
            by_past: dict[int, list[int]] = {}
            for i, r in enumerate(rows):
                by_past.setdefault(min(W, b * state.chunks_done[r]), []).append(i)
            for part in by_past.values():
                group = [rows[i] for i in part]
                self._learn(state, group, last_targets[part])
        for r in rows:
            state.chunks_done[r] += 1

    def _learn(self, state: State, rows: list[int], last_targets: torch.Tensor) -> None:
        """The inner step of ``rows`` (whose caches have one length), written to the state."""
        assert self.window is not None
        start = self.chunk * state.chunks_done[rows[0]]
        past = min(self.window, start)
        every = len(rows) == state.batch_size
        graph = None
        if every and past == self.window:
            graph = self._graph(state, ("learn",), lambda: _LearnGraph(self, state, last_targets))
        if graph is not None:
            norms = graph.replay(last_targets)
        else:
            sel = slice(None) if every else torch.tensor(rows, device=state.device)
            norms = self._learn_rows(state, sel, past, start, last_targets, True)
        self._count_skipped(state, rows, norms)

    def _learn_rows(self, state: State, sel: torch.Tensor | slice, past: int, start: int,
                    last_targets: torch.Tensor, write: bool) -> torch.Tensor:
        """The inner step of rows ``sel`` (all: ``slice(None)``) whose TTT caches hold ``past``
        keys, at the chunk starting at token ``start``; with ``write``, its results go to
        the state. Returns the update norms ``[R]``. Under CUDA-graph capture nothing reads
        the device from the host (a non-finite update is then dropped on the device)."""
        assert self.window is not None
        W = self.window
        new_fast, new_inner, caches, update_norm = self._inner_step(state, sel, past, start,
                                                                    last_targets)
        if not write:
            return update_norm
        for w, new in zip(state.fast, flatten_fast(new_fast)):
            w[sel] = new.to(w.dtype)
        for key, tensors in new_inner.items():
            for t, new in zip(state.inner[key], tensors):
                t[sel] = new.to(t.dtype)
        if state.fast_cast is not None:
            # In place, so that a captured decode graph sees the new weights.
            for c, w in zip(state.fast_cast, state.fast):
                c.copy_(w)
        for j, (k, v) in enumerate(caches):
            # The cache after the chunk (the learning forward's keys: the training cache holds
            # those), right-aligned at slot W - 1; older slots are masked.
            kept = k.shape[1]
            state.ttt_keys[j][sel, :, W - kept:W] = k.transpose(1, 2).to(state.ttt_keys[j].dtype)
            state.ttt_values[j][sel, :, W - kept:W] = v.transpose(1, 2).to(
                state.ttt_values[j].dtype)
            state.ttt_keys_rope[j][sel, :, :W] = rope_slots(state.ttt_keys[j][sel, :, :W],
                                                            self.config)
        return update_norm

    def _count_skipped(self, state: State, rows: list[int], norms: torch.Tensor) -> None:
        """Count the inner updates that were not finite (norms ``[R]`` or ``[R, n]``; the
        model's chunk forward kept those sequences' fast weights) in
        ``state.skipped_updates``, and warn once. One read of the device."""
        bad = (~torch.isfinite(norms)).reshape(len(rows), -1).sum(-1).tolist()
        if not any(bad):
            return
        for r, n in zip(rows, bad):
            state.skipped_updates[r] += int(n)
        if not self._warned_skip:
            self._warned_skip = True
            which = [r for r, n in zip(rows, bad) if n]
            warnings.warn(
                f"the inner update of sequence(s) {which} is not finite (NaN or infinite loss "
                f"or gradient; inner_lr={self.inner_lr}): those sequences keep their fast "
                "weights for that chunk; state.skipped_updates counts such skips (check the "
                "model's weights and inner_lr)", RuntimeWarning, stacklevel=4)

    def _inner_step(self, state: State, idx: torch.Tensor | slice, past: int, start: int,
                    last_targets: torch.Tensor
                    ) -> tuple[FastWeights, InnerState, list[tuple], torch.Tensor]:
        """Learn from the pending chunk of rows ``idx``: the model's own chunk forward
        (:meth:`TTTForCausalLM.ttt_chunk`, as in training) over the chunk's prefix outputs, the
        cache at the chunk's start and the fast weights in effect, with its inner step.

        Returns the new fast weights and inner-optimizer state, per TTT block the cache after
        the chunk (keys before RoPE, values ``[R, past', H, d]``) and the update norms ``[R]``.
        """
        assert state.pending_hidden is not None and state.pending_tokens is not None
        assert self.window is not None
        W, b = self.window, self.chunk
        # Leave inference mode: autograd refuses inference tensors, so everything read from
        # the state (or made under inference mode, like the RoPE tables) is copied first.
        with torch.inference_mode(False), torch.no_grad():
            cos_t, sin_t = self._local_rope()
            rope = (cos_t[W - past:W + b].clone(), sin_t[W - past:W + b].clone())
            h = state.pending_hidden[idx].clone()  # [R, b, D]
            targets = torch.cat((state.pending_tokens[idx, 1:], last_targets[:, None].long()),
                                dim=1).clone()  # [R, b]
            counted = torch.ones_like(targets, dtype=torch.bool)
            if self.ignore_bos_targets:
                counted = targets != self.config.bos_token_id
            caches = [(state.ttt_keys[j][idx, :, W - past:W].transpose(1, 2).clone(),
                       state.ttt_values[j][idx, :, W - past:W].transpose(1, 2).clone())
                      for j in range(len(self.ttt_blocks))]
            fast = unflatten_fast([w[idx].clone() for w in state.fast])
            inner = map_state(torch.clone, index_state(state.inner, idx))
            opts = self.model.options(ttt=True, inner_lr=self.inner_lr)
            *_, new_caches, new_fast, new_inner, update_norm, _ = self.model.ttt_chunk(
                h, targets, counted, start, rope, caches, fast, inner, opts, True, False)
        return new_fast, new_inner, new_caches, update_norm
