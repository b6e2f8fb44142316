"""``tttlm bench``: refuses at once without a CUDA GPU, keeps existing reports, and runs end to
end on a CPU as an explicit smoke run (``--device cpu``) with tiny shapes, writing its reports
(the GPU numbers in benchmarks/results come from the same code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tttlm.bench
from tttlm.cli import main

SMOKE = {
    "decode": ["decode", "--presets", "tiny", "--contexts", "128", "512", "--modes", "eager",
               "--steps", "2", "--warmup", "1", "--dtype", "float32"],
    "prefill": ["prefill", "--preset", "tiny", "--lengths", "128", "--tokens-per-step", "256",
                "--attention", "auto", "first-order", "--ttt-groups", "all", "1"],
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_bench_writes_reports(name: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["bench", *SMOKE[name], "--device", "cpu", "--repeats", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    text = json.dumps(report)
    assert "e2e" in text and "full" in text
    assert "torch" in text and out.with_suffix(".md").read_text().count("|") > 10
    assert not list(tmp_path.glob(".*tmp*"))  # written through temporary files, none left


def test_prefill_times_each_ttt_group_for_e2e_only(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["bench", *SMOKE["prefill"], "--device", "cpu", "--repeats", "1",
                 "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    seen = {(r["variant"], r["attention"], r["ttt_group"]) for r in rows}
    assert {g for v, _, g in seen if v == "e2e"} == {"all", 1}
    assert {g for v, _, g in seen if v == "full"} == {"all"}
    assert all("error" not in r for r in rows)
    assert "ttt_group" in out.with_suffix(".md").read_text()


def test_prefill_refuses_a_bad_ttt_group(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "prefill", "--device", "cpu", "--ttt-groups", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("tttlm bench prefill: error: argument --ttt-groups: '0' is not")


def test_graph_mode_needs_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "decode", "--device", "cpu", "--presets", "tiny", "--modes", "graph",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("tttlm bench decode: error: the graph mode replays CUDA graphs")


@pytest.mark.parametrize("name", ["kernel", "prefill", "decode", "train"])
def test_refuses_at_once_without_cuda(name: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Before: the device fell back to the CPU and `bench kernel` ran for minutes before dying
    # in Triton. Now every benchmark refuses before any work, naming where to read on.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark ran")

    for fn in ("bench_chunk_kernel", "bench_prefill", "bench_decode", "bench_train_step"):
        monkeypatch.setattr(tttlm.bench, fn, never)
    assert main(["bench", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tttlm bench {name}: error: needs a CUDA GPU")
    assert "see benchmarks/README.md" in err
    assert not any(tmp_path.iterdir())


def test_kernel_on_cpu_needs_the_triton_interpreter(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["bench", "kernel", "--device", "cpu", "--out", str(tmp_path / "k")]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err.splitlines()[-1]


def test_kernel_smoke_run_on_cpu(tmp_path: Path) -> None:
    """The kernel benchmark's code path, through Triton's CPU interpreter (set before Triton
    compiles anything: a fresh process)."""
    pytest.importorskip("triton")
    out = tmp_path / "kernel"
    code = ("import sys; from tttlm.cli import main; sys.exit(main(['bench', 'kernel', "
            "'--device', 'cpu', '--window', '32', '--chunk', '16', '--heads', '1', "
            f"'--head-dim', '16', '--repeats', '1', '--out', {str(out)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    if result.returncode != 0 and "interpreter" in result.stderr.lower():
        pytest.skip("this Triton's CPU interpreter cannot run the kernels")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {(r["backend"], r["phase"]) for r in rows} == {
        (b, p) for b in ("naive", "triton", "triton-all-tiles")
        for p in ("fwd", "fwd+bwd", "fwd+bwd+dbl")}
    assert all(r["ms_median"] > 0 for r in rows)
    errors = {r["backend"]: r["rel_l2_vs_fp32_naive"] for r in rows
              if "rel_l2_vs_fp32_naive" in r}
    # skipping wholly masked tiles changes no bit
    assert errors["triton"] == errors["triton-all-tiles"]
    naive_error = next(r for r in rows if "rel_l2_vs_fp32_naive" in r and
                       r["backend"] == "naive")["rel_l2_vs_fp32_naive"]
    assert max(naive_error.values()) < 0.05  # bf16 against fp32, same code


def test_default_out_keeps_committed_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Before: the default --out was benchmarks/results/<name>, the repository's committed
    # results, silently overwritten by any run from the repository root.
    monkeypatch.chdir(tmp_path)
    args = ["bench", *SMOKE["decode"], "--device", "cpu", "--repeats", "1"]
    assert main(args) == 0
    report = tmp_path / "bench-results" / "decode.json"
    assert report.is_file() and not (tmp_path / "benchmarks").exists()
    before = report.read_bytes()
    capsys.readouterr()
    assert main(args) == 2  # an existing report is kept
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("tttlm bench decode: error: ") and "--overwrite" in err
    assert report.read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_prefill_times_the_engine_with_and_without_its_graphs(tmp_path: Path) -> None:
    """``--paths engine engine-graphs``: Engine.prefill beside the same with
    ``cuda_graphs=True`` (on a CPU no graph is captured: the route, not the speed)."""
    out = tmp_path / "report"
    assert main(["bench", "prefill", "--preset", "tiny", "--lengths", "128", "--batch", "1",
                 "--variants", "e2e", "--paths", "engine", "engine-graphs", "--device", "cpu",
                 "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["engine", "engine-graphs"]
    assert all("error" not in r and r["s_median"] > 0 for r in rows)


def test_prefill_graphed_blocks_replay_the_steady_chunks(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile graphed``: compiled blocks with the TTT chunks over full caches replayed as
    a graph (on a CPU its buffers run eagerly: the route, not the speed)."""
    from tttlm.model.cuda_graph import ChunkGraph

    steps = []
    step = ChunkGraph.step
    monkeypatch.setattr(ChunkGraph, "step", lambda self, *a: steps.append(1) or step(self, *a))
    out = tmp_path / "report"
    assert main(["bench", "prefill", "--preset", "tiny", "--lengths", "256", "--batch", "1",
                 "--variants", "e2e", "--compile", "graphed", "--device", "cpu",
                 "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["blocks"] for r in rows] == ["graphed"]
    assert all("error" not in r and r["s_median"] > 0 for r in rows)
    # tiny: window 64, chunks of 32: chunks 2-6 of each run (two warm-ups, timed) are
    # replayed; chunks 0-1 too once the second warm-up repeats the first's shapes
    assert len(steps) == 5 + (2 + 5) + (2 + 5)
    steps.clear()  # --compile launched (and compiled: the default, which a CPU never graphs)
    assert main(["bench", "prefill", "--preset", "tiny", "--lengths", "256", "--batch", "1",
                 "--variants", "e2e", "--compile", "launched", "compiled", "--device", "cpu",
                 "--repeats", "1", "--out", str(out), "--overwrite"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["blocks"] for r in rows] == ["launched", "compiled"] and not steps


def test_environment_records_the_host_and_picks_the_card_row(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reports name the host's CPU and the switches set (Inductor's, the project's); of
    nvidia-smi's rows, the card's own (by PCI bus), the only one when no bus is known, and
    none where it cannot be told or is malformed."""
    import torch

    from tttlm.bench.common import GPU_STATE_FIELDS, environment, pick_gpu_row

    monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "0")
    monkeypatch.setenv("TTTLM_CACHE_SWAP", "0")
    monkeypatch.setenv("TTTLMX", "not ours")
    env = environment(torch.device("cpu"))
    assert env["host"]["cpus"] >= 1 and "gpu_state" not in env
    assert env["settings"]["TORCHINDUCTOR_COORDINATE_DESCENT_TUNING"] == "0"
    assert env["settings"]["TTTLM_CACHE_SWAP"] == "0" and "TTTLMX" not in env["settings"]
    rows = ("00000000:18:00.0, 1980, 1980, 120.5, 700.00, 35, 570.1\n"
            "00000000:2A:00.0, 1755, 1980, 690.1, 700.00, 71, 570.1\n")
    got = pick_gpu_row(rows, 0x2A)
    assert got == dict(zip(GPU_STATE_FIELDS, ["1755", "1980", "690.1", "700.00", "71",
                                              "570.1"], strict=True))
    assert pick_gpu_row(rows, None) is None  # two cards, no bus: not told apart
    assert pick_gpu_row(rows.splitlines()[0], None)["clocks.sm"] == "1980"
    assert pick_gpu_row(rows, 0x99) is None
    assert pick_gpu_row("garbage\nx:y:z, 1, 2\n", 0x18) is None


def test_scoring_case_runs_the_scoring_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probes' shared case: a seeded e2e model in eval mode and a timed step that runs the
    scoring forward with test-time training (no outer gradient), once per call."""
    from tttlm.bench.prefill import scoring_case

    model, step = scoring_case("tiny", 96, 2, torch.device("cpu"), compiled=False)
    assert not model.training and not model.compile_blocks
    assert model.config.variant.value == "e2e"
    calls = []
    original = model.run_ttt_chunks

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "run_ttt_chunks", counted)
    assert step() > 0 and step() > 0
    assert calls == [False, False]
