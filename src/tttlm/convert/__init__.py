"""Checkpoint conversion: the official TTT-E2E code ↔ tttlm, transformers Llama/Qwen models
→ tttlm, and full-attention models → their sliding-window / TTT-E2E forms."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tttlm.lazy import lazy_exports

if TYPE_CHECKING:
    from tttlm.convert.hf import (
        config_from_hf,
        convert_hf,
        from_hf_model,
        import_hf,
        state_dict_from_hf,
    )
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
    from tttlm.convert.ttt_ify import ttt_ify

__all__ = [
    "config_from_hf",
    "convert_hf",
    "convert_official",
    "find_model_weights",
    "from_hf_model",
    "from_official",
    "import_hf",
    "infer_config",
    "load_official_arrays",
    "official_name_of",
    "official_shapes",
    "read_orbax",
    "state_dict_from_hf",
    "to_official",
    "ttt_ify",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["convert_official", "from_official", "infer_config", "load_official_arrays",
                     "official_name_of", "official_shapes", "to_official"],
                    "tttlm.convert.official"),
    **dict.fromkeys(["find_model_weights", "read_orbax"], "tttlm.convert.orbax"),
    **dict.fromkeys(["config_from_hf", "convert_hf", "from_hf_model", "import_hf",
                     "state_dict_from_hf"], "tttlm.convert.hf"),
    "ttt_ify": "tttlm.convert.ttt_ify",
})
