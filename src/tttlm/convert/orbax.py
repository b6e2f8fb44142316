"""Read official TTT-E2E Orbax checkpoints without JAX or Orbax.

The official trainer saves ``model.weights()`` with Orbax's ``StandardCheckpointHandler`` into
``<ckpt>/<step>/model_weights/``: a ``_METADATA`` json describing the PyTree, and one zarr array
per leaf stored inside an OCDBT key-value store, under the dot-joined tree path. ``tensorstore``
(the library Orbax itself writes with) reads that layout directly, so installing JAX just to
convert a checkpoint is unnecessary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_EXPECTED = ("give an official Orbax checkpoint directory (<ckpt>/<step>/model_weights) or a .npz "
             "of official arrays")


def find_model_weights(path: str | Path) -> Path:
    """Resolve PATH to the ``model_weights`` folder of an official checkpoint.

    PATH may be the checkpoint root (the latest numeric step is taken, as Orbax's
    ``CheckpointManager.latest_step`` would), one ``<step>/`` folder, or ``model_weights`` itself,
    so users can point at whatever they downloaded.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; check the checkpoint path")
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory; {_EXPECTED}")
    if (root / "_METADATA").is_file():
        return root
    if (root / "model_weights" / "_METADATA").is_file():
        return root / "model_weights"
    steps = sorted(
        (int(p.name), p) for p in root.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "model_weights" / "_METADATA").is_file())
    if steps:
        return steps[-1][1] / "model_weights"
    raise ValueError(f"no model_weights/_METADATA under {root}; {_EXPECTED}")


def _array_names(metadata: dict[str, Any], source: Path) -> list[str]:
    tree = metadata.get("tree_metadata")
    if not isinstance(tree, dict):
        raise ValueError(f"{source} has no 'tree_metadata'; {_EXPECTED}")
    names = []
    for key, entry in tree.items():
        value = entry.get("value_metadata", {})
        if value.get("value_type") == "None" or value.get("skip_deserialize"):
            continue
        parts = [str(k["key"]) for k in entry.get("key_metadata", ())]
        if not parts:
            raise ValueError(f"{source}: entry {key} has no key_metadata, so its array has no "
                             f"name; {_EXPECTED}")
        names.append(".".join(parts))
    return names


def read_orbax(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an official checkpoint as float32 numpy, keyed by dot-joined name.

    Leaves that the official model stores as ``None`` (norm biases, the tied ``lm_head``, state
    indices) are skipped. Arrays are cast to float32 because tttlm keeps master weights in fp32;
    the released checkpoints are fp32 already, so this is normally a no-op and bit-exact.
    """
    try:
        import tensorstore as ts
    except ImportError:
        raise ImportError(
            "reading an Orbax checkpoint needs tensorstore; pip install 'tttlm[orbax]'") from None

    weights = find_model_weights(path)
    meta_file = weights / "_METADATA"
    try:
        metadata = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot parse {meta_file} ({err}); {_EXPECTED}") from None
    names = _array_names(metadata, meta_file)
    if not names:
        raise ValueError(f"{meta_file} lists no arrays; {_EXPECTED}")

    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    base = weights.resolve()
    if (base / "manifest.ocdbt").is_file():
        def kvstore(name: str) -> dict[str, Any]:
            return {"driver": "ocdbt", "base": {"driver": "file", "path": f"{base}/"},
                    "path": f"{name}/"}
    else:
        def kvstore(name: str) -> dict[str, Any]:
            return {"driver": "file", "path": f"{base / name}/"}

    use_zarr3 = metadata.get("use_zarr3")
    if use_zarr3 is None:
        probe = ts.KvStore.open(kvstore(names[0]), context=context).result()
        use_zarr3 = probe.read("zarr.json").result().state == "value"
    driver = "zarr3" if use_zarr3 else "zarr"

    pending = {}
    for name in names:
        spec = {"driver": driver, "kvstore": kvstore(name)}
        try:
            store = ts.open(spec, open=True, read=True, context=context).result()
        except Exception as err:  # tensorstore raises plain ValueError/RuntimeError variants
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"cannot open array {name} in {weights} ({detail}); check that the "
                             "checkpoint was copied completely") from None
        pending[name] = store.read()
    arrays = {}
    for name, future in pending.items():
        arrays[name] = np.ascontiguousarray(np.asarray(future.result()).astype(np.float32,
                                                                                copy=False))
    return arrays
