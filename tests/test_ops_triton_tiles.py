"""The Triton kernels' tile configurations: the module default, an environment override read
at every call, and one line for a malformed value."""

from __future__ import annotations

import pytest

from tttlm.ops.triton_tiles import tile_config


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
