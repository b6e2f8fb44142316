"""Decode latency per token at long context; see :mod:`tttlm.bench.decode`.

    python benchmarks/decode_latency.py --presets 125m 760m --variants e2e full \
        --contexts 8192 32768 131072 --modes eager graph --out benchmarks/results/decode

Same as ``tttlm bench decode``; kept so that the committed results' commands still run.
"""

import sys

from tttlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
