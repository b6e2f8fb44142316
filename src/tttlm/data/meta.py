"""The ``meta.json`` that describes a prepared data folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tttlm.data.errors import DataError

META_FILE = "meta.json"
FORMAT = "tttlm-tokens"
VERSION = 1


def read_meta(prepared_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``meta.json`` of a prepared folder, after checking that it is one."""
    path = Path(prepared_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{Path(prepared_dir)}: no {META_FILE}; prepare the data with "
                        "`tttlm data prepare`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{path}: not a {FORMAT} v{VERSION} folder (format "
                        f"{meta.get('format')!r}, version {meta.get('version')!r})")
    return meta
