"""Paged session tensors: a save writes only the pages that changed since the last one.

A decoding state is mostly key/value caches (``[B, H, slots, d]``), and a reply of a few dozen
tokens rewrites a few dozen slots of each: a whole-state save per reply (a 125m state at an 8K
window is ~390 MB in bfloat16) writes mostly what is already on disk. Here every tensor is cut
into *pages* (4-D caches along their slot axis, about :data:`PAGE_BYTES` each; other tensors
whole), and every page is named by the sha256 of its dtype, shape and bytes. A save looks up
each page among the pages its folder (and an optional ``base`` folder) already holds and writes
the new ones into one *pack* (a safetensors file keyed by page hash, named by its own sha256),
so saving costs hashing the state plus writing what changed. Packs are immutable: one taken
from ``base`` is hard-linked, not copied (a forked session shares its parent's files on disk).

The manifest (``session.json``, written last by the caller) lists, per tensor, its dtype,
shape, slot axis and pages as ``[pack, hash]``; every page read back is checked against its
hash, so a pack that was cut, replaced or mixed in is refused, not used. When the packs a
manifest needs hold more than twice the state's bytes (pages that later saves replaced), the
save writes every page afresh and the old packs go.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tttlm.errors import UserError
from tttlm.files import atomic_save, fsync_dir, link_or_copy

PAGE_BYTES = 1 << 18  # 256 KiB: a 64-token reply touches one or two pages of each cache
PACK_RE = re.compile(r"^session-[0-9a-f]{16}\.safetensors$")
_SLOT_AXIS = 2  # of the 4-D caches [B, H, slots, d]
_MAX_WASTE = 2.0  # compact when the needed packs hold more than this times the state


@dataclass(frozen=True)
class Page:
    tensor: str
    data: torch.Tensor  # contiguous, on the CPU
    key: str  # sha256 of dtype, shape and bytes


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def page_key(data: torch.Tensor) -> str:
    h = hashlib.sha256(f"{dtype_name(data.dtype)}{list(data.shape)}\n".encode())
    if data.numel():
        # hashlib releases the GIL on large buffers: pages hash in parallel threads.
        h.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _slices(t: torch.Tensor, page_bytes: int) -> list[tuple[int, int]] | None:
    """Slot ranges of a 4-D cache's pages, or None for a tensor kept whole."""
    if t.dim() != 4 or t.shape[_SLOT_AXIS] == 0:
        return None
    per_slot = t.shape[0] * t.shape[1] * t.shape[3] * t.element_size()
    step = max(1, page_bytes // max(1, per_slot))
    n = t.shape[_SLOT_AXIS]
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def cut_pages(tensors: dict[str, torch.Tensor], page_bytes: int
              ) -> tuple[dict[str, dict[str, Any]], list[Page]]:
    """Cut tensors (on any device) into hashed CPU pages: the manifest's per-tensor layout
    (pages still without packs) and the pages, in order."""
    pieces: list[tuple[str, torch.Tensor]] = []
    layout: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        spans = _slices(t, page_bytes)
        parts = [t] if spans is None else [t.narrow(_SLOT_AXIS, a, b - a) for a, b in spans]
        # One copy per page, on the host: a GPU state's pages are cut on the device.
        pieces += [(name, p.contiguous().cpu()) for p in parts]
        layout[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "axis": None if spans is None else _SLOT_AXIS, "pages": []}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        keys = list(pool.map(lambda piece: page_key(piece[1]), pieces))
    return layout, [Page(name, data, key) for (name, data), key in zip(pieces, keys)]


def _known_pages(folder: Path, manifest: dict[str, Any] | None) -> dict[str, str]:
    """page hash -> pack, for the pages a paged manifest in ``folder`` lists (checked by
    :func:`check_pages_manifest`). A pack that is gone or not the size the manifest names is
    skipped: its pages are written again rather than referenced."""
    if not manifest:
        return {}
    sizes = manifest["packs"]
    intact = {pack for pack in sizes
              if (folder / pack).is_file() and (folder / pack).stat().st_size == sizes[pack]}
    return {key: pack for entry in manifest["pages"].values()
            for pack, key in reversed(entry["pages"]) if pack in intact}


def write_tensor_file(out: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> tuple[str, int, str]:
    """Write ``tensors`` durably into a new safetensors file in ``out`` named by its sha256
    (``session-<16 hex>.safetensors``, so that a save never overwrites the file a manifest
    names): its name, bytes and sha256."""
    from safetensors.torch import save_file

    staged = out / f".session-staged-{uuid.uuid4().hex[:8]}.safetensors"
    try:
        atomic_save(staged, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        size, digest = staged.stat().st_size, file_sha256(staged)
        name = f"session-{digest[:16]}.safetensors"
        os.replace(staged, out / name)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return name, size, digest


def write_pages(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                current: dict[str, Any] | None, base: Path | None = None,
                base_manifest: dict[str, Any] | None = None,
                page_bytes: int | None = None) -> dict[str, Any]:
    """Save ``tensors`` (any device) into folder ``out`` as pages, reusing the pages of ``out``'s
    current manifest and of ``base``'s. Returns the manifest fields ``tensors`` (this save's
    pack, which carries ``metadata``), ``pages`` and ``packs``; the caller writes the
    manifest, then deletes the packs it does not name."""
    layout, pages = cut_pages(tensors, page_bytes or PAGE_BYTES)
    state_bytes = sum(p.data.numel() * p.data.element_size() for p in pages)
    here = _known_pages(out, current)
    there = _known_pages(base, base_manifest) if base is not None else {}
    local = set(here.values())

    def path_of(pack: str) -> Path:
        return out / pack if pack in local else base / pack  # type: ignore[operator]

    where = {p.key: here.get(p.key) or there[p.key] for p in pages
             if p.key in here or p.key in there}
    fresh = [p for p in pages if p.key not in where]
    reused = set(where.values())
    kept = sum(path_of(pack).stat().st_size for pack in reused)
    fresh_bytes = sum(p.data.numel() * p.data.element_size() for p in fresh)
    if kept + fresh_bytes > _MAX_WASTE * state_bytes + PAGE_BYTES:
        where, fresh, reused = {}, pages, set()  # mostly replaced pages: start afresh
    for pack in reused - local:
        link_or_copy(path_of(pack), out / pack)
    name, size, digest = write_tensor_file(out, {p.key: p.data for p in fresh}, metadata)
    fsync_dir(out)
    for page in pages:
        layout[page.tensor]["pages"].append([where.get(page.key, name), page.key])
    packs = {pack: (out / pack).stat().st_size for pack in {*reused, name}}
    return {"tensors": {"file": name, "bytes": size, "sha256": digest},
            "pages": layout, "packs": packs}


def check_pages_manifest(meta: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless the manifest's ``pages`` and ``packs`` are well formed."""
    packs = meta.get("packs")
    if not (isinstance(packs, dict) and all(
            isinstance(k, str) and PACK_RE.match(k) and isinstance(v, int) and v >= 0
            for k, v in packs.items())):
        raise ValueError("packs must give each pack file's bytes")
    layout = meta.get("pages")
    if not isinstance(layout, dict):
        raise ValueError("pages must describe every tensor")
    for name, entry in layout.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
              and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
              and entry.get("axis") in (None, _SLOT_AXIS) and isinstance(entry.get("pages"), list)
              and all(isinstance(p, list) and len(p) == 2 and p[0] in packs
                      and isinstance(p[1], str) and len(p[1]) == 64 for p in entry["pages"]))
        if not ok:
            raise ValueError(f"pages.{name} is not a tensor's layout")
        _dtype(entry.get("dtype"))


def read_pages(src: Path, meta: dict[str, Any], device: str | torch.device,
               damaged: str) -> dict[str, torch.Tensor]:
    """The tensors of a paged manifest (checked by :func:`check_pages_manifest`), each page
    checked against its hash (pages of the manifest's own pack, whose whole file the caller
    has checked, excepted)."""
    head = meta["tensors"]["file"]
    handles: dict[str, Any] = {}
    out: dict[str, torch.Tensor] = {}
    try:
        for pack, size in meta["packs"].items():
            file = src / pack
            if not file.is_file() or file.stat().st_size != size:
                raise UserError(f"session {src}: pack {pack} is missing or not the size "
                                f"session.json names (cut or mixed with another save); "
                                f"{damaged}")
        for name, entry in meta["pages"].items():
            parts = []
            for pack, key in entry["pages"]:
                if pack not in handles:
                    handles[pack] = safe_open(str(src / pack), framework="pt", device="cpu")
                try:
                    part = handles[pack].get_tensor(key)
                except SafetensorError:
                    raise UserError(f"session {src}: pack {pack} lacks a page of {name}; "
                                    f"{damaged}") from None
                if pack != head and page_key(part) != key:
                    raise UserError(f"session {src}: a page of {name} in {pack} is not the "
                                    f"page session.json names (cut or mixed with another "
                                    f"save); {damaged}")
                parts.append(part)
            dtype, shape = _dtype(entry["dtype"]), tuple(entry["shape"])
            tensor = (parts[0] if entry["axis"] is None and len(parts) == 1
                      else torch.cat(parts, entry["axis"]) if parts else None)
            if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise UserError(f"session {src}: the pages of {name} do not make its "
                                f"{entry['dtype']} {list(shape)} tensor; {damaged}")
            out[name] = tensor.to(device)
    except SafetensorError as err:
        raise UserError(f"session {src}: a pack is not a readable safetensors file ({err}); "
                        f"{damaged}") from None
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
