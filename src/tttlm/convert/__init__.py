"""Checkpoint conversion between the official TTT-E2E code and tttlm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.convert.official import (
        convert_official,
        from_official,
        infer_config,
        load_official_arrays,
        official_name_of,
        official_shapes,
        to_official,
    )
    from tttlm.convert.orbax import find_model_weights, read_orbax

__all__ = [
    "convert_official",
    "find_model_weights",
    "from_official",
    "infer_config",
    "load_official_arrays",
    "official_name_of",
    "official_shapes",
    "read_orbax",
    "to_official",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["convert_official", "from_official", "infer_config", "load_official_arrays",
                     "official_name_of", "official_shapes", "to_official"],
                    "tttlm.convert.official"),
    **dict.fromkeys(["find_model_weights", "read_orbax"], "tttlm.convert.orbax"),
})
