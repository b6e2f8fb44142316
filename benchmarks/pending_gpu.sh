#!/usr/bin/env bash
# The GPU measurements the open issues still owe, one part per call (each fits a 10-minute
# device command). Run from the repository root on a CUDA machine:
#
#   OUT=out PART=train|prefill|recall|serve|variants|recurrent|compare|sessions|finetune \
#     bash benchmarks/pending_gpu.sh
#
# `serve` needs the serve extra and the openai client; on a machine without an index, bring
# wheels built here for the device's Python (e.g. 3.12):
#   pip download -d .wheels --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --implementation cp openai fastapi uvicorn
# and install them there first: python -m pip install --no-index --find-links .wheels \
#   openai fastapi uvicorn
# `recurrent` needs flash-linear-attention the same way (pip download ... flash-linear-attention
# fla-core einops). `finetune` needs gguf and accelerate the same way, and the SmolLM2 GGUF file
# (93 MB, over one call's 64 MiB carry): split it here (split -n 2 FILE .gguf-parts/part-),
# carry `.gguf-parts` in one call and `.gguf-parts2` in the next (a warm machine keeps the
# first), then cat them together into .gguf/SmolLM2-135M-Instruct.Q4_1.gguf; each call of
# this part advances the experiment (it resumes from --work) until the report is written.
set -u
: "${OUT:?set OUT to the output folder}" "${PART:?set PART}"
export PYTHONPATH=src
mkdir -p "$OUT"
case "$PART" in
  train)  # speed issue: tttlm train itself, micro-batch 8 (fits an H200) vs 4
    timeout 560 python benchmarks/train_cli.py --preset 125m-8k --batch 16 --micro-batch 8 \
      --steps 7 --skip 3 --runs e2e:compiled-graph full:compiled-graph \
      --out "$OUT/train_cli_125m_8k_mb8" ;;
  prefill)  # speed issue: Engine.prefill (what tttlm generate uses) beside the scoring forward
    timeout 560 python -m tttlm.cli bench prefill --preset 3b --lengths 8192 131072 \
      --compile compiled --attention first-order --paths model engine --repeats 2 \
      --out "$OUT/prefill_engine_3b" ;;
  recall)  # retrieval issue: the request cost of rag=end with the FTS5 index
    timeout 560 python benchmarks/recall_latency.py --preset 760m \
      --contexts 8192 32768 131072 --new-tokens 128 --requests 3 \
      --out "$OUT/recall_latency_760m_fts5" ;;
  serve)  # serving issue: 64 sessions of 32K context, e2e vs full (disk: full's sessions are
          # 4x larger, so it gets fewer)
    timeout 280 python benchmarks/serve_load.py --preset 125m --variant e2e --context 32768 \
      --sessions 64 --in-memory 64 --max-batch 64 --tokens 64 --rounds 2 --device cuda \
      --out "$OUT" --name serve_gpu_125m_e2e_32k
    timeout 280 python benchmarks/serve_load.py --preset 125m --variant full --context 32768 \
      --sessions 16 --in-memory 16 --max-batch 64 --tokens 64 --rounds 2 --device cuda \
      --out "$OUT" --name serve_gpu_125m_full_32k ;;
  variants)  # baselines issue: the paper's speed figure for the variants tttlm has
    timeout 400 python -m tttlm.cli bench prefill --preset 3b --variants e2e swa full hybrid \
      --lengths 8192 32768 131072 --compile compiled --repeats 2 --out "$OUT/prefill_variants_3b"
    timeout 150 python -m tttlm.cli bench decode --presets 760m --variants e2e swa full hybrid \
      --contexts 8192 131072 --modes graph --out "$OUT/decode_variants_760m" ;;
  recurrent)  # baselines issue: the recurrent hybrids (first GPU run of their kernels)
    timeout 400 python -m tttlm.cli bench prefill --preset 3b \
      --variants ttt_kvb gated_deltanet mamba2 \
      --lengths 8192 32768 131072 --compile compiled --repeats 2 \
      --out "$OUT/prefill_recurrent_3b"
    timeout 150 python -m tttlm.cli bench decode --presets 760m \
      --variants ttt_kvb gated_deltanet mamba2 --contexts 8192 131072 --modes eager graph \
      --out "$OUT/decode_recurrent_760m" ;;
  compare)  # baselines issue: the small same-tokens training comparison of all seven
    timeout 560 python benchmarks/variants_small.py --device cuda --work /tmp/variants-small \
      --out "$OUT/variants_small_h200" ;;
  sessions)  # serving issue: per-reply session saves on the GPU (device -> host copy, hashing)
    timeout 560 python benchmarks/session_save.py --preset 125m --dtype bfloat16 --replies 4 \
      --tokens 64 --out "$OUT" --name session_save_125m_h200 ;;
  finetune)  # pretrained-models issue: (a)-(d) from SmolLM2-135M, loss by position to 8K
    timeout 570 python benchmarks/finetune_experiment.py --source .gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
      --work /tmp/smol-exp --steps 120 --batch-size 16 --micro-batch-size 8 --seq-len 8192 \
      --eval-sequences 32 --device cuda --out "$OUT" --name finetune_smollm2_h200 ;;
  *) echo "PART=$PART: use train, prefill, recall, serve, variants, recurrent, compare," \
       "sessions or finetune" >&2
     exit 2 ;;
esac
