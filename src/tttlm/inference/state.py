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
* ``mixers``: per recurrent block, the tensors of its state. TTT-KVB (``ttt_kvb`` models): its
  fast weights (``linear``: ``W [B, H, d,
  d]``, ``b [B, H, d]``; ``mlp``: W1, b1, W2, b2) at the start of the current chunk (where the
  chunk's gradients are taken), then the same after the tokens read so far; float32 (float64
  for a float64 model). Gated DeltaNet: the last 3 inputs of its short convolutions of q, k, v
  ``[B, H * d, 3]`` each, then the delta-rule state ``[B, H, d, d]``.
* ``lengths`` / ``chunks_done``: per sequence, tokens read and chunks learned from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tttlm.config import Variant
from tttlm.errors import UserError
from tttlm.files import LOCK_NAME, FolderLock, atomic_write_text, fsync_dir
from tttlm.inference.pages import (
    check_pages_manifest,
    file_sha256,
    read_pages,
    write_pages,
    write_tensor_file,
)
from tttlm.model.cache import rope_slots

SESSION_FORMAT = "tttlm-session"
SESSION_VERSION = 2  # 2: the manifest names the tensor file and its sha256
PAGED_VERSION = 3  # 3: tensors in hashed pages, written only when changed (State.save paged)
TENSORS_NAME = "session.safetensors"  # version 1's tensor file
META_NAME = "session.json"  # the manifest, written last
_LISTS = ("prefix_keys", "prefix_values", "ttt_keys", "ttt_values", "fast", "mixers")
# Tensor files of version 2 are named by their content; temporary files of a save in progress.
_TENSORS_RE = re.compile(r"^session(-[0-9a-f]{16})?\.safetensors$")
_TEMP_RE = re.compile(r"^\.+session.*\.tmp-|^\.session-staged-")
_DAMAGED = "save the session again, or start a new one"
_COUNTERS = ("config_fingerprint", "weights_digest", "lengths", "chunks_done",
             "skipped_updates")


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
    # The inner optimizer's per-sequence state (momentum buffers, ...): name -> tensors [B, ...]
    inner: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    mixers: list[torch.Tensor] = field(default_factory=list)
    config_fingerprint: str = ""
    weights_digest: str = ""
    # Per sequence: inner steps skipped because their gradient or update was not finite (the
    # sequence kept its fast weights; see Engine).
    skipped_updates: list[int] = field(default_factory=list)
    # The fast weights cast to a lower compute dtype (derived; refreshed in place after each
    # inner step).
    fast_cast: list[torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.skipped_updates:
            self.skipped_updates = [0] * len(self.lengths)

    def __repr__(self) -> str:
        skipped = f", skipped_updates={self.skipped_updates}" if any(self.skipped_updates) else ""
        return (f"State(batch={self.batch_size}, lengths={self.lengths}, "
                f"chunks_done={self.chunks_done}{skipped}, {self.nbytes() / 2**20:.1f} MiB)")

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
        for key, tensors in self.inner.items():
            for i, t in enumerate(tensors):
                out[f"inner.{key}.{i}"] = t
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
                     inner={k: [fn(t) for t in v] for k, v in self.inner.items()},
                     mixers=[fn(t) for t in self.mixers],
                     config_fingerprint=self.config_fingerprint,
                     weights_digest=self.weights_digest,
                     skipped_updates=list(self.skipped_updates))

    def clone(self) -> State:
        """An independent copy (decoding one leaves the other untouched)."""
        return self._map(lambda t: t.clone())

    def select(self, rows: list[int]) -> State:
        """The sub-batch of the given sequences (a copy)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        out = self._map(lambda t: t.index_select(0, index))
        out.lengths = [self.lengths[r] for r in rows]
        out.chunks_done = [self.chunks_done[r] for r in rows]
        out.skipped_updates = [self.skipped_updates[r] for r in rows]
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
        if any(s.config_fingerprint != first.config_fingerprint
               or s.weights_digest != first.weights_digest for s in states):
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
            skipped_updates=[n for s in states for n in s.skipped_updates],
            prefix_keys=cat_list("prefix_keys"), prefix_values=cat_list("prefix_values"),
            ttt_keys=cat_list("ttt_keys"), ttt_values=cat_list("ttt_values"),
            ttt_keys_rope=cat_list("ttt_keys_rope"),
            pending_hidden=torch.cat([s.pending_hidden for s in states]) if pending else None,
            pending_tokens=torch.cat([s.pending_tokens for s in states]) if pending else None,
            fast=[torch.cat([s.fast[i] for s in states]) for i in range(len(first.fast))],
            inner={k: [torch.cat([s.inner[k][i] for s in states]) for i in range(len(v))]
                   for k, v in first.inner.items()},
            mixers=cat_list("mixers"),
            config_fingerprint=first.config_fingerprint, weights_digest=first.weights_digest)

    # ------------------------------------------------------------------------ sessions
    def _counters(self) -> dict[str, Any]:
        return {"config_fingerprint": self.config_fingerprint,
                "weights_digest": self.weights_digest, "lengths": self.lengths,
                "chunks_done": self.chunks_done, "skipped_updates": self.skipped_updates}

    def save(self, path: str | os.PathLike[str], *,
             command: str = "generate --save-session", paged: bool = False,
             base: str | os.PathLike[str] | None = None) -> Path:
        """Write the state to directory ``path``: a tensor file, then ``session.json``.

        ``session.json`` is the manifest, written last: it names the tensor file with its
        size and sha256, the model's config fingerprint and weight digest (so that
        :meth:`load` refuses a session of another model) and the counters. Each file is
        written durably, and a new save writes its tensors under a new name (from their
        hash), so that an interrupted save leaves the previous session whole. The folder is
        locked while saving (``command`` names the owner in a refusal). An existing folder
        must be a session (it is replaced) or empty.

        ``paged=True`` writes the tensors as hashed pages (:mod:`tttlm.inference.pages`):
        only the pages that neither ``path``'s current session nor the session in folder
        ``base`` holds are written (after a few decoded tokens, a few pages per cache), and
        the packs taken from ``base`` are hard-linked. A server saving a session after every
        reply writes what the reply changed, not the whole state.
        """
        out = Path(path)
        check_session_folder(out)
        with FolderLock(out, command):
            check_session_folder(out)  # again, now that nobody else writes there
            if paged:  # the pages are cut on the state's device, then copied to the host
                tensors = {k: v.detach() for k, v in self._tensors().items()}
                self._save_paged(out, tensors, None if base is None else Path(base))
                return out
            tensors = {k: v.detach().contiguous().cpu() for k, v in self._tensors().items()}
            name, size, digest = write_tensor_file(
                out, tensors, {k: json.dumps(v) for k, v in self._counters().items()})
            fsync_dir(out)
            meta = {"format": SESSION_FORMAT, "version": SESSION_VERSION, **self._counters(),
                    "layers": {**{n: len(getattr(self, n)) for n in _LISTS},
                               "inner": {k: len(v) for k, v in self.inner.items()}},
                    "tensors": {"file": name, "bytes": size, "sha256": digest}}
            atomic_write_text(out / META_NAME, json.dumps(meta, indent=2) + "\n")
            for old in out.iterdir():  # earlier saves' tensors, crashed saves' temporaries
                if old.name not in (name, META_NAME, LOCK_NAME):
                    old.unlink(missing_ok=True)
        return out

    def _save_paged(self, out: Path, tensors: dict[str, torch.Tensor],
                    base: Path | None) -> None:
        metadata = {k: json.dumps(v) for k, v in self._counters().items()}
        fields = write_pages(out, tensors, metadata, current=_manifest_or_none(out),
                             base=base, base_manifest=(None if base is None
                                                       else _manifest_or_none(base)))
        meta = {"format": SESSION_FORMAT, "version": PAGED_VERSION, **self._counters(),
                "layers": {**{n: len(getattr(self, n)) for n in _LISTS},
                           "inner": {k: len(v) for k, v in self.inner.items()}},
                **fields}
        atomic_write_text(out / META_NAME, json.dumps(meta) + "\n")
        for old in out.iterdir():  # packs no page needs any more, crashed saves' temporaries
            if old.name not in (*fields["packs"], META_NAME, LOCK_NAME):
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: Any,
             device: str | torch.device | None = None, check_weights: bool = True) -> State:
        """Read a session written by :meth:`save` for ``model`` (a ``TTTForCausalLM``).

        Raises :class:`~tttlm.errors.UserError` (a ``ValueError``) when the session belongs
        to another configuration, or (with ``check_weights``) to other weights of the same
        configuration, or when its files are damaged: a tensor file that is not the one the
        manifest names (an interrupted or mixed save), a manifest whose counters or layout do
        not fit the model. With ``check_weights=False`` a session of other weights is taken
        over by ``model``.
        """
        src = Path(path)
        meta_file = src / META_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{src} is not a tttlm session: expected {META_NAME} and "
                                    "its tensor file (write one with State.save)")
        meta = _read_manifest(meta_file)
        expected = model.config.fingerprint()
        if meta["config_fingerprint"] != expected:
            raise UserError(
                f"session {src} was written by a model with config fingerprint "
                f"{meta['config_fingerprint']}, this model's is {expected}: a session only "
                "continues on the model that wrote it; load that model")
        digest = weights_digest(model)
        if check_weights and meta["weights_digest"] != digest:
            raise UserError(
                f"session {src} was written by a model with other weights (digest "
                f"{meta['weights_digest']}, this model {digest}): a session only continues "
                "on the model that wrote it; load that model (or pass check_weights=False)")
        tensor_file = _check_tensor_file(src, meta)
        param = model.embed.weight
        device = param.device if device is None else torch.device(device)
        try:
            with safe_open(str(tensor_file), framework="pt", device=str(device)) as f:
                recorded = f.metadata() or {}
                raw = ({} if meta["version"] >= PAGED_VERSION
                       else {k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        except SafetensorError as err:
            raise UserError(f"session {src}: {tensor_file.name} is not a readable safetensors "
                            f"file ({err}); {_DAMAGED}") from None
        if meta["version"] >= PAGED_VERSION:
            raw = read_pages(src, meta, device, _DAMAGED)
        raw = {k: _aligned(t) for k, t in raw.items()}
        if meta["version"] >= 2:
            # The counters are in the (hashed) tensor file too: an edited manifest shows.
            edited = [k for k in _COUNTERS if recorded.get(k) != json.dumps(meta[k])]
            if edited:
                raise UserError(f"session {src}: {META_NAME} does not match its tensor file "
                                f"({', '.join(edited)} differ: the manifest was edited or "
                                f"mixed with another save); {_DAMAGED}")
        inner_counts = meta["layers"].get("inner", {})
        wanted = ({f"{n}.{i}" for n in _LISTS for i in range(meta["layers"][n])}
                  | {f"inner.{k}.{i}" for k, n in inner_counts.items() for i in range(n)})
        missing = sorted(wanted - set(raw))
        if missing:
            raise UserError(f"session {src}: {tensor_file.name} lacks {missing[:3]}; "
                            f"{_DAMAGED}")

        def group(name: str) -> list[torch.Tensor]:
            return [raw[f"{name}.{i}"] for i in range(meta["layers"][name])]

        def cache(name: str) -> list[torch.Tensor]:
            return [t.to(param.dtype) for t in group(name)]

        state = cls(lengths=list(meta["lengths"]), chunks_done=list(meta["chunks_done"]),
                    prefix_keys=cache("prefix_keys"), prefix_values=cache("prefix_values"),
                    ttt_keys=cache("ttt_keys"), ttt_values=cache("ttt_values"),
                    pending_hidden=raw.get("pending_hidden"),
                    pending_tokens=raw.get("pending_tokens"),
                    fast=group("fast"),
                    inner={k: [raw[f"inner.{k}.{i}"] for i in range(n)]
                           for k, n in inner_counts.items()},
                    mixers=group("mixers"),
                    config_fingerprint=expected,
                    weights_digest=meta["weights_digest"] if check_weights else digest,
                    skipped_updates=list(meta["skipped_updates"]))
        _check_layout(state, model, src)
        if state.pending_hidden is not None:
            state.pending_hidden = state.pending_hidden.to(param.dtype)
        state.ttt_keys_rope = [rope_slots(k, model.config) for k in state.ttt_keys]
        return state


# -------------------------------------------------------------------------- session files
def check_session_folder(path: str | os.PathLike[str]) -> None:
    """Refuse to save a session to ``path`` when that would replace something else: a file, or
    a folder holding files that are not a session's (a save replaces the session there)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a session folder; choose a folder name")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _session_file(p.name))
        if foreign:
            raise UserError(f"{out} holds files that are not part of a session "
                            f"({', '.join(foreign[:3])}); save the session to a new or empty "
                            "folder")


def _session_file(name: str) -> bool:
    """Whether a file may be replaced by a session save (its own files, the lock)."""
    return (name in (META_NAME, LOCK_NAME) or bool(_TENSORS_RE.match(name))
            or bool(_TEMP_RE.match(name)))


def _manifest_or_none(folder: Path) -> dict[str, Any] | None:
    """A folder's session manifest when it is a readable paged one (whose pages a new save
    may reuse), else None."""
    try:
        meta = _read_manifest(folder / META_NAME)
    except (OSError, UserError):
        return None
    return meta if meta["version"] >= PAGED_VERSION else None


def _count_list(meta: dict[str, Any], key: str, batch: int) -> list[int]:
    value = meta.get(key)
    if not (isinstance(value, list) and len(value) == batch and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)):
        raise ValueError(f"{key} must be {batch} counts >= 0, got {value!r}")
    return value


def _read_manifest(meta_file: Path) -> dict[str, Any]:
    """``session.json``, checked field by field (a hand-edited manifest is refused, not
    half-used)."""
    src = meta_file.parent
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"session {src}: {META_NAME} is not valid JSON ({err}); "
                        f"{_DAMAGED}") from None
    if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT:
        raise UserError(f"{meta_file} is not a tttlm session manifest; {_DAMAGED}")
    version = meta.get("version")
    if version not in (1, SESSION_VERSION, PAGED_VERSION):
        raise UserError(f"{meta_file} is a version-{version} session; this tttlm reads versions "
                        f"1 to {PAGED_VERSION}: use the tttlm that wrote it")
    try:
        for key in ("config_fingerprint", "weights_digest"):
            if not isinstance(meta.get(key), str):
                raise ValueError(f"{key} must be a string, got {meta.get(key)!r}")
        lengths = meta.get("lengths")
        batch = len(lengths) if isinstance(lengths, list) else 0
        if batch == 0:
            raise ValueError(f"lengths must list at least one sequence, got {lengths!r}")
        _count_list(meta, "lengths", batch)
        _count_list(meta, "chunks_done", batch)
        if version == 1:
            meta["skipped_updates"] = [0] * batch
        _count_list(meta, "skipped_updates", batch)
        layers = meta.get("layers")
        if isinstance(layers, dict):
            layers.setdefault("mixers", 0)  # sessions written before recurrent blocks existed
        if not (isinstance(layers, dict) and all(
                isinstance(layers.get(n), int) and layers[n] >= 0 for n in _LISTS)):
            raise ValueError(f"layers must give a count for each of {', '.join(_LISTS)}")
        inner = layers.get("inner", {})
        if not (isinstance(inner, dict) and all(
                isinstance(k, str) and isinstance(n, int) and n >= 0 for k, n in inner.items())):
            raise ValueError("layers.inner must give a count per inner-optimizer state")
        if version >= 2:
            tensors = meta.get("tensors")
            if not (isinstance(tensors, dict) and isinstance(tensors.get("file"), str)
                    and _TENSORS_RE.match(tensors["file"])
                    and isinstance(tensors.get("sha256"), str)
                    and isinstance(tensors.get("bytes"), int)):
                raise ValueError("tensors must name the tensor file, its bytes and sha256")
        if version >= PAGED_VERSION:
            check_pages_manifest(meta)
    except ValueError as err:
        raise UserError(f"session {src}: {META_NAME} is damaged ({err}); {_DAMAGED}") from None
    return meta


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory aligned as PyTorch allocates it (64 bytes). A file's tensors come at
    their offsets in it (8-byte aligned), and CPU matrix kernels round differently at other
    alignments: a loaded session must continue bit for bit as the live state it saved."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _check_tensor_file(src: Path, meta: dict[str, Any]) -> Path:
    """The tensor file the manifest names, checked against its size and hash."""
    if meta["version"] == 1:
        tensor_file = src / TENSORS_NAME
        if not tensor_file.is_file():
            raise FileNotFoundError(f"{src} is not a tttlm session: expected {META_NAME} and "
                                    f"{TENSORS_NAME} (write one with State.save)")
        warnings.warn(f"session {src} is a version-1 session, whose tensor file cannot be "
                      "checked against its manifest; save it again to upgrade it",
                      UserWarning, stacklevel=3)
        return tensor_file
    entry = meta["tensors"]
    tensor_file = src / entry["file"]
    if not tensor_file.is_file():
        raise UserError(f"session {src}: {META_NAME} names {entry['file']}, which is missing; "
                        f"{_DAMAGED}")
    size = tensor_file.stat().st_size
    if size != entry["bytes"] or file_sha256(tensor_file) != entry["sha256"]:
        raise UserError(f"session {src}: {entry['file']} is not the file {META_NAME} names "
                        f"({size} bytes, expected {entry['bytes']} with sha256 "
                        f"{entry['sha256'][:16]}…): it was cut or mixed with another save; "
                        f"{_DAMAGED}")
    return tensor_file


def _check_layout(state: State, model: Any, src: Path) -> None:
    """Refuse a session whose counters or tensor shapes do not fit ``model`` (the engine
    would otherwise continue from a wrong position or fail deep inside a step)."""
    config = model.config
    B, H, d, b = state.batch_size, config.num_kv_heads, config.head_dim, config.chunk_size
    e2e = config.variant is Variant.E2E
    problems: list[str] = []

    def shape(name: str, t: torch.Tensor | None, want: tuple[int | None, ...]) -> None:
        got = None if t is None else tuple(t.shape)
        if got is None or len(got) != len(want) or any(
                w is not None and g != w for g, w in zip(got, want)):
            problems.append(f"{name} has shape {got}, expected "
                            f"{tuple('*' if w is None else w for w in want)}")

    n_prefix, n_ttt = len(model.prefix_layers), len(model.ttt_layers) if e2e else 0
    recurrent = [layer.recurrent for layer in model.layers if layer.recurrent is not None]
    counts = {"prefix_keys": n_prefix, "prefix_values": n_prefix, "ttt_keys": n_ttt,
              "ttt_values": n_ttt, "fast": 3 * n_ttt,
              "mixers": sum(len(m.state_shapes()) for m in recurrent)}
    for name, n in counts.items():
        if len(getattr(state, name)) != n:
            problems.append(f"{len(getattr(state, name))} {name} tensors, the model has {n}")
    if problems:
        raise UserError(f"session {src} does not fit this model: {problems[0]}; {_DAMAGED}")
    mixer_shapes = [s for mixer in recurrent for s in mixer.state_shapes()]
    for i, (t, want) in enumerate(zip(state.mixers, mixer_shapes)):
        shape(f"mixers.{i}", t, (B, *want))
    for name in ("prefix_keys", "prefix_values"):
        for i, t in enumerate(getattr(state, name)):
            window = config.layer_window(i)
            slots = (0 if config.is_recurrent_layer(i) else None if window is None
                     else window + b)
            shape(f"{name}.{i}", t, (B, H, slots, d))
            if window is None and t.shape[2:3] and t.shape[2] < max(state.lengths):
                problems.append(f"{name}.{i} holds {t.shape[2]} positions, fewer than "
                                f"{max(state.lengths)} tokens read")
    if e2e:
        assert config.window is not None
        for name in ("ttt_keys", "ttt_values"):
            for i, t in enumerate(getattr(state, name)):
                shape(f"{name}.{i}", t, (B, H, config.window + b, d))
        weights = [w for layer in model.ttt_layers for w in layer.prime.weights()]
        for i, (t, w) in enumerate(zip(state.fast, weights)):
            shape(f"fast.{i}", t, (B, *w.shape))
            if not t.is_floating_point():
                problems.append(f"fast.{i} is {t.dtype}, not floating point")
        expected = model.inner_optimizer.init_state(model.initial_fast_weights(1))
        if set(state.inner) != set(expected):
            problems.append(f"inner-optimizer state {sorted(state.inner)}, the model's "
                            f"{config.inner_optimizer} optimizer keeps {sorted(expected)}")
        for key, tensors in expected.items():
            got = state.inner.get(key, [])
            if len(got) != len(tensors):
                problems.append(f"{len(got)} inner.{key} tensors, the model keeps "
                                f"{len(tensors)}")
            for i, (t, w) in enumerate(zip(got, tensors)):
                shape(f"inner.{key}.{i}", t, (B, *w.shape[1:]))
        shape("pending_hidden", state.pending_hidden, (B, b, config.hidden_size))
        shape("pending_tokens", state.pending_tokens, (B, b))
        tokens = state.pending_tokens
        if tokens is not None and (tokens.is_floating_point() or (tokens.numel() and (
                int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size))):
            problems.append("pending_tokens holds ids outside the vocabulary")
    for r, (n, c) in enumerate(zip(state.lengths, state.chunks_done)):
        pending = n - b * c
        ok = (1 <= pending <= b or n == c == 0) if e2e else c == 0
        if not ok:
            problems.append(f"sequence {r} has read {n} tokens but learned from {c} chunks of "
                            f"{b}")
    if problems:
        raise UserError(f"session {src} does not fit this model: {problems[0]}; {_DAMAGED}")
