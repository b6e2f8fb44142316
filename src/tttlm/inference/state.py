"""The decoding state of one batch of sequences, and sessions saved to disk.

A :class:`State` is everything the model needs to continue a batch of sequences: per layer a
bounded key/value cache, the fast weights every sequence has learned so far, and the tokens of
the chunk that has not been learned from yet. For ``e2e`` and ``swa`` models its size does not
depend on how many tokens were read; for ``full`` the cache grows with the context.

Layout (``B`` sequences, ``H`` heads of width ``d``, window ``k``, chunk ``b``):

* ``prefix_keys / prefix_values``: per prefix block ``[B, H, C, d]``; keys after QK-norm and
  RoPE at *absolute* positions, as the training forward computes them. Windowed models use a
  ring of ``C = k + b`` slots (token ``p`` lives in slot ``p % C``; ``b`` spare slots let up to
  ``b`` new tokens be written before attending without overwriting a key they still need).
  ``full`` stores token ``p`` in slot ``p`` and grows ``C`` by doubling.
* ``ttt_keys / ttt_values``: per TTT block ``[B, H, k + b, d]``, keys after QK-norm and
  *before* RoPE. Slot ``s`` holds the key at local RoPE position ``s`` of the training forward:
  slots ``k - past .. k - 1`` are the cache at the start of the pending chunk (``past =
  min(k, chunks_done * b)`` keys), slots ``k .. k + b - 1`` the pending chunk's own keys.
  ``ttt_keys_rope`` is the same cache with RoPE applied (derived, not saved).
* ``pending_hidden [B, b, D]`` / ``pending_tokens [B, b]``: the prefix-block outputs and ids of
  the pending chunk; its inner step runs when the token after it arrives, because that token
  is the chunk's last target.
* ``fast``: the fast weights (the TTT blocks' prime-MLP w1, w2, w3), ``[B, ...]`` each, in
  float32 (float64 for a float64 model), as the official inner loop keeps them.
* ``lengths`` / ``chunks_done``: per sequence, tokens read and chunks learned from.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tttlm.ops.rope import apply_rope, rope_angles

SESSION_FORMAT = "tttlm-session"
SESSION_VERSION = 1
TENSORS_NAME = "session.safetensors"
META_NAME = "session.json"
_LISTS = ("prefix_keys", "prefix_values", "ttt_keys", "ttt_values", "fast")


def rope_slots(keys: torch.Tensor, config: Any) -> torch.Tensor:
    """RoPE of a TTT-block cache ``[B, H, S, d]`` whose slot ``s`` sits at local position ``s``."""
    cos, sin = rope_angles(torch.arange(keys.shape[2], device=keys.device), config.head_dim,
                           config.rope_theta, keys.dtype)
    return apply_rope(keys.transpose(1, 2), cos, sin).transpose(1, 2).contiguous()


def weights_digest(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights (a few rows of every matrix, all norms).

    Values are rounded to bfloat16 first so that the same weights held in float32 or
    bfloat16 give the same digest.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        sample = tensor.detach()
        if sample.dim() >= 2:
            sample = sample[:2]
        h.update(name.encode())
        h.update(sample.to("cpu", torch.bfloat16).float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(eq=False)
class State:
    """Per-sequence decoding state; see the module docstring for the layout of each field.

    ``Engine.step`` and ``Engine.prefill`` update a state in place (and return it); use
    :meth:`clone` to branch a conversation.
    """

    lengths: list[int]
    chunks_done: list[int]
    prefix_keys: list[torch.Tensor]
    prefix_values: list[torch.Tensor]
    ttt_keys: list[torch.Tensor] = field(default_factory=list)
    ttt_values: list[torch.Tensor] = field(default_factory=list)
    ttt_keys_rope: list[torch.Tensor] = field(default_factory=list)
    pending_hidden: torch.Tensor | None = None
    pending_tokens: torch.Tensor | None = None
    fast: list[torch.Tensor] = field(default_factory=list)
    config_fingerprint: str = ""
    weights_digest: str = ""
    # The fast weights cast to a lower compute dtype (derived; refreshed in place after each
    # inner step).
    fast_cast: list[torch.Tensor] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"State(batch={self.batch_size}, lengths={self.lengths}, "
                f"chunks_done={self.chunks_done}, {self.nbytes() / 2**20:.1f} MiB)")

    # ------------------------------------------------------------------------- queries
    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def device(self) -> torch.device:
        return self.prefix_keys[0].device if self.prefix_keys else self.ttt_keys[0].device

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every saved tensor under a stable name (``ttt_keys_rope`` is derived, not saved)."""
        out: dict[str, torch.Tensor] = {}
        for name in _LISTS:
            for i, t in enumerate(getattr(self, name)):
                out[f"{name}.{i}"] = t
        if self.pending_hidden is not None and self.pending_tokens is not None:
            out["pending_hidden"] = self.pending_hidden
            out["pending_tokens"] = self.pending_tokens
        return out

    def nbytes(self) -> int:
        """Bytes held by the state's tensors, derived copies included."""
        tensors = [*self._tensors().values(), *self.ttt_keys_rope, *(self.fast_cast or [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---------------------------------------------------------------------- batch edits
    def _map(self, fn: Any) -> State:
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return State(lengths=list(self.lengths), chunks_done=list(self.chunks_done),
                     prefix_keys=[fn(t) for t in self.prefix_keys],
                     prefix_values=[fn(t) for t in self.prefix_values],
                     ttt_keys=[fn(t) for t in self.ttt_keys],
                     ttt_values=[fn(t) for t in self.ttt_values],
                     ttt_keys_rope=[fn(t) for t in self.ttt_keys_rope],
                     pending_hidden=opt(self.pending_hidden),
                     pending_tokens=opt(self.pending_tokens),
                     fast=[fn(t) for t in self.fast],
                     config_fingerprint=self.config_fingerprint,
                     weights_digest=self.weights_digest)

    def clone(self) -> State:
        """An independent copy (decoding one leaves the other untouched)."""
        return self._map(lambda t: t.clone())

    def select(self, rows: list[int]) -> State:
        """The sub-batch of the given sequences (a copy)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        out = self._map(lambda t: t.index_select(0, index))
        out.lengths = [self.lengths[r] for r in rows]
        out.chunks_done = [self.chunks_done[r] for r in rows]
        return out

    @staticmethod
    def stack(states: list[State]) -> State:
        """Concatenate states of the same model along the batch axis.

        ``full`` caches of different capacities are zero-padded to the largest (slots beyond a
        sequence's length are never attended to).
        """
        if not states:
            raise ValueError("State.stack needs at least one state")
        first = states[0]
        if any(s.config_fingerprint != first.config_fingerprint for s in states):
            raise ValueError("cannot stack states of different models")

        def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
            cap = max(t.shape[2] for t in tensors) if tensors[0].dim() == 4 else None
            if cap is not None:
                tensors = [t if t.shape[2] == cap else torch.nn.functional.pad(
                    t, (0, 0, 0, cap - t.shape[2])) for t in tensors]
            return torch.cat(tensors, 0)

        def cat_list(name: str) -> list[torch.Tensor]:
            return [cat([getattr(s, name)[i] for s in states])
                    for i in range(len(getattr(first, name)))]

        pending = first.pending_hidden is not None
        return State(
            lengths=[n for s in states for n in s.lengths],
            chunks_done=[n for s in states for n in s.chunks_done],
            prefix_keys=cat_list("prefix_keys"), prefix_values=cat_list("prefix_values"),
            ttt_keys=cat_list("ttt_keys"), ttt_values=cat_list("ttt_values"),
            ttt_keys_rope=cat_list("ttt_keys_rope"),
            pending_hidden=torch.cat([s.pending_hidden for s in states]) if pending else None,
            pending_tokens=torch.cat([s.pending_tokens for s in states]) if pending else None,
            fast=[torch.cat([s.fast[i] for s in states]) for i in range(len(first.fast))],
            config_fingerprint=first.config_fingerprint, weights_digest=first.weights_digest)

    # ------------------------------------------------------------------------ sessions
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the state to directory ``path`` (``session.safetensors`` + ``session.json``).

        The JSON records the model's config fingerprint and weight digest, so that
        :meth:`load` can refuse a session written by another model.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._tensors().items()}
        save_file(tensors, str(out / TENSORS_NAME))
        meta = {"format": SESSION_FORMAT, "version": SESSION_VERSION,
                "config_fingerprint": self.config_fingerprint,
                "weights_digest": self.weights_digest,
                "lengths": self.lengths, "chunks_done": self.chunks_done,
                "layers": {name: len(getattr(self, name)) for name in _LISTS}}
        (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Any,
             device: str | torch.device | None = None, check_weights: bool = True) -> State:
        """Read a session written by :meth:`save` for ``model`` (a ``TTTForCausalLM``).

        Raises ``ValueError`` when the session belongs to another configuration, or (with
        ``check_weights``) to other weights of the same configuration.
        """
        src = Path(path)
        meta_file, tensor_file = src / META_NAME, src / TENSORS_NAME
        if not meta_file.is_file() or not tensor_file.is_file():
            raise FileNotFoundError(f"{src} is not a tttlm session: expected {META_NAME} and "
                                    f"{TENSORS_NAME} (write one with State.save)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != SESSION_FORMAT or meta.get("version") != SESSION_VERSION:
            raise ValueError(f"{meta_file} is not a version-{SESSION_VERSION} tttlm session")
        expected = model.config.fingerprint()
        if meta["config_fingerprint"] != expected:
            raise ValueError(
                f"session {src} was written by a model with config fingerprint "
                f"{meta['config_fingerprint']}, this model's is {expected}: a session only "
                "continues on the model that wrote it")
        if check_weights and meta["weights_digest"] != weights_digest(model):
            raise ValueError(
                f"session {src} was written by a model with other weights (digest "
                f"{meta['weights_digest']}, this model {weights_digest(model)}): a session only "
                "continues on the model that wrote it")
        param = model.embed.weight
        device = param.device if device is None else torch.device(device)
        raw = load_file(str(tensor_file), device=str(device))

        def group(name: str) -> list[torch.Tensor]:
            return [raw[f"{name}.{i}"] for i in range(meta["layers"][name])]

        def cache(name: str) -> list[torch.Tensor]:
            return [t.to(param.dtype) for t in group(name)]

        state = cls(lengths=list(meta["lengths"]), chunks_done=list(meta["chunks_done"]),
                    prefix_keys=cache("prefix_keys"), prefix_values=cache("prefix_values"),
                    ttt_keys=cache("ttt_keys"), ttt_values=cache("ttt_values"),
                    pending_hidden=raw.get("pending_hidden"),
                    pending_tokens=raw.get("pending_tokens"),
                    fast=group("fast"), config_fingerprint=expected,
                    weights_digest=meta["weights_digest"])
        if state.pending_hidden is not None:
            state.pending_hidden = state.pending_hidden.to(param.dtype)
        state.ttt_keys_rope = [rope_slots(k, model.config) for k in state.ttt_keys]
        return state
