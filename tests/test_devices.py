"""One device and precision resolution for every command (tttlm.devices)."""

from __future__ import annotations

import pytest
import torch

from tttlm.devices import autocast, autocast_dtype, check_device_name, resolve_device
from tttlm.errors import UserError

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_autocast_settings() -> None:
    assert autocast_dtype(CPU) is None and autocast_dtype(GPU) is torch.bfloat16
    assert autocast_dtype(GPU, "auto", torch.float64) is None  # float64 runs are exactness runs
    assert autocast_dtype(GPU, "auto", torch.float32) is torch.bfloat16
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16 and autocast_dtype(GPU, "none") is None
    with pytest.raises(UserError, match="autocast='fp8' is not known; use auto, bf16, none"):
        autocast_dtype(CPU, "fp8")
    with autocast(CPU):  # auto on a CPU: full precision
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_names_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_device_name("cuda:3") == ("cuda", 3) and check_device_name("auto") == ("auto",
                                                                                        None)
    with pytest.raises(UserError, match=r"^--device 'mps' is not known; use auto, cpu, cuda or "
                                        r"cuda:N$"):
        resolve_device("mps", option="--device")
    assert resolve_device(None) == resolve_device("auto")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match=r"^--device cuda but no GPU is visible \(CUDA is not "
                                        r"available\); use --device cpu or auto$"):
        resolve_device("cuda", option="--device")
    assert resolve_device("auto") == CPU
