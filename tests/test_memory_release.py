"""A forward leaves nothing behind: what it made is freed when the caller drops it, by
reference counting alone (no garbage collection), also for the first forward of a process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# In a fresh interpreter: the first forward is where lazily loaded modules load.
SCRIPT = textwrap.dedent("""
    import gc, types, weakref, torch
    from _helpers import tiny_model, tokens
    from tttlm.inference import Engine

    model = tiny_model()
    x, y = tokens(model, 2, 40)
    gc.disable()

    def ours() -> int:
        return sum(1 for f in gc.get_objects()
                   if type(f) is types.FrameType and "tttlm" in f.f_code.co_filename)

    for path in ("engine", "model"):
        with torch.inference_mode():
            if path == "engine":
                _, out = Engine(model, ttt=True).prefill(x)
            else:
                out = model(x, labels=y)
        ref = weakref.ref(out)
        del out
        print(path, ref() is None, ours())
""")


def test_first_forward_frees_what_it_made() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent)  # for tests/_helpers
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines == ["engine True 0", "model True 0"], done.stdout
