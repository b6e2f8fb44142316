"""The Triton kernels' tile configurations: the module default, an environment override read
at every call, and one line for a malformed value."""

from __future__ import annotations

import pytest

from tttlm.ops import triton_tiles
from tttlm.ops.triton_tiles import rotate_products, tile_config


def test_default_override_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTTLM_TEST_TILES", raising=False)
    assert tile_config("TTTLM_TEST_TILES", (64, 32, 4, 3)) == (64, 32, 4, 3)
    monkeypatch.setenv("TTTLM_TEST_TILES", "")
    assert tile_config("TTTLM_TEST_TILES", (64, 32, 4, 3)) == (64, 32, 4, 3)
    monkeypatch.setenv("TTTLM_TEST_TILES", "16,128,8,2")
    assert tile_config("TTTLM_TEST_TILES", (64, 32, 4, 3)) == (16, 128, 8, 2)
    monkeypatch.setenv("TTTLM_TEST_TILES", "32,32,2,1")  # changed between calls: read again
    assert tile_config("TTTLM_TEST_TILES", (64, 32, 4, 3)) == (32, 32, 2, 1)
    for bad in ("64,32,4", "64,32,4,x", "64;32;4;3"):
        monkeypatch.setenv("TTTLM_TEST_TILES", bad)
        with pytest.raises(ValueError, match="TTTLM_TEST_TILES=.*four integers"):
            tile_config("TTTLM_TEST_TILES", (64, 32, 4, 3))


def test_rotation_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The window kernels' rotation: the module default where unset or empty, 0 / 1 read at
    every call, anything else refused in one line."""
    monkeypatch.delenv("TTTLM_WINDOW_ROTATE", raising=False)
    assert rotate_products() is triton_tiles.ROTATE_DEFAULT
    monkeypatch.setattr(triton_tiles, "ROTATE_DEFAULT", not triton_tiles.ROTATE_DEFAULT)
    assert rotate_products() is triton_tiles.ROTATE_DEFAULT
    monkeypatch.setenv("TTTLM_WINDOW_ROTATE", "")
    assert rotate_products() is triton_tiles.ROTATE_DEFAULT
    monkeypatch.setenv("TTTLM_WINDOW_ROTATE", "1")
    assert rotate_products() is True
    monkeypatch.setenv("TTTLM_WINDOW_ROTATE", "0")
    assert rotate_products() is False
    for bad in ("yes", "2", " 1"):
        monkeypatch.setenv("TTTLM_WINDOW_ROTATE", bad)
        with pytest.raises(ValueError, match="TTTLM_WINDOW_ROTATE=.*give 0 or 1"):
            rotate_products()
