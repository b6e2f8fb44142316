#!/usr/bin/env bash
# The GPU measurements the open issues still owe, one part per call (each fits a 10-minute
# device command). Run from the repository root on a CUDA machine:
#
#   OUT=out PART=train|prefill|traffic|kernel|speed|operands|flash|cudnn_chunks|graphs|descend|final|kept_kernels|kept_prefill|census|fill|lean|one_sequence|session|eager|frozen|triton_fwd|frozen_triton|own_dkdv|train_kernel|pairs|cache_swap|inductor|settle|norms|next|prefix_merge|window_sequence|capture|rope|fold|head|first_order|prefill_small|groups|recall|recall_smol|serve|variants|decode|compare|sessions|finetune \
#     bash benchmarks/pending_gpu.sh
#
# `serve` needs the serve extra and the openai client; on a machine without an index, bring
# wheels built here for the device's Python (e.g. 3.12):
#   pip download -d .wheels --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --implementation cp openai fastapi uvicorn
# and install them there first: python -m pip install --no-index --find-links .wheels \
#   openai fastapi uvicorn
# `variants` and `decode` need flash-linear-attention for gated_deltanet and mamba2, brought
# the same way (pip download ... flash-linear-attention fla-core einops); a wheel-only install
# may leave the package off the path: PYTHONPATH=<site-packages of the wheels> is kept below.
# `finetune` needs gguf the same way, and the SmolLM2 GGUF file (93 MB, over one call's 64 MiB
# carry): split it here (split -n 2 FILE), carry the first half in one call and copy it to /tmp
# there (a carried path does not survive to the next call; /tmp does while the machine stays
# warm, about 30 s idle), carry the second half in the next call and cat the two into
# .gguf/SmolLM2-135M-Instruct.Q4_1.gguf. The experiment resumes from --work (/tmp/smol-exp), so
# calls chained on one warm machine advance it until the report is written (~25 minutes of
# device time in all at the defaults below: (c) trains at ~9K tokens/s on an H200, bound by
# kernel launches at micro-batch 1: FINETUNE_ARGS="--micro-batch-size auto" tries the largest
# micro-batch that fits).
set -u
: "${OUT:?set OUT to the output folder}" "${PART:?set PART}"
# (src first, keeping what the caller put on the path: wheels carried to the device)
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
# Reports are written to a scratch folder and only their JSON copied to $OUT (a call brings
# back at most 8 files); benchmarks/merge_reports.py joins them into one report here.
SCRATCH=$(mktemp -d)
prefill_each() {  # SECONDS VARIANT...: the 3b prefill at 8K-128K, one process per variant
  local each=$1; shift
  for v in "$@"; do
    timeout "$each" python -m tttlm.cli bench prefill --preset 3b --variants "$v" \
      --lengths 8192 32768 131072 --compile compiled --repeats 2 \
      --out "$SCRATCH/prefill_3b_$v" || echo "prefill $v: exit $?"
    cp "$SCRATCH/prefill_3b_$v.json" "$OUT/" 2>/dev/null
  done
}
final_row() {  # NAME SECONDS ARGS...: one 3b bench prefill process of a table, its rows
  # printed and its JSON kept as soon as written (a call cut at its limit keeps what ran)
  local name=$1 each=$2; shift 2
  timeout "$each" python -m tttlm.cli bench prefill --preset 3b --compile compiled \
    --repeats 2 "$@" --out "$SCRATCH/prefill_final_3b_$name" > /dev/null \
    || echo "$name: exit $?"
  grep "^| [ef]" "$SCRATCH/prefill_final_3b_$name.md" 2>/dev/null
  cp "$SCRATCH/prefill_final_3b_$name.json" "$OUT/" 2>/dev/null
}
case "$PART" in
  train)  # speed issue: tttlm train itself, micro-batch 8 (fits an H200) vs 4
    timeout 560 python benchmarks/train_cli.py --preset 125m-8k --batch 16 --micro-batch 8 \
      --steps 7 --skip 3 --runs e2e:compiled-graph full:compiled-graph \
      --out "$OUT/train_cli_125m_8k_mb8" ;;
  prefill)  # speed issue: Engine.prefill (what tttlm generate uses) beside the scoring forward
    timeout 560 python -m tttlm.cli bench prefill --preset 3b --lengths 8192 131072 \
      --compile compiled --attention first-order --paths model engine engine-graphs \
      --repeats 2 --out "$OUT/prefill_engine_3b" ;;
  traffic)  # speed issue: the traffic changes of benchmarks/results/traffic_census_cpu.md on a
    # GPU, before and after, in one run: needs the earlier tree's src at .before/src, made here
    # with `mkdir .before && git archive da38b74 src | tar -x -C .before` and carried
    # (PART=prefill of compare_before_after.sh: 3b 8K and 128K; then its decode-train part and
    # tttlm train itself at 125m 8K, compiled graph, micro-batch 8, for each side)
    ROOT=$PWD BEFORE_SRC=.before/src OUT="$OUT" PART=prefill \
      timeout 400 bash benchmarks/compare_before_after.sh
    for side in before after; do
      src=$PWD/src; [ $side = before ] && src=$PWD/.before/src
      PYTHONPATH=$src timeout 90 python benchmarks/train_cli.py --preset 125m-8k --batch 16 \
        --micro-batch 8 --steps 5 --skip 2 --runs e2e:compiled-graph \
        --out "$OUT/train_cli_125m_8k_$side" || echo "train $side: exit $?"
    done ;;
  kernel)  # speed issue: the Triton chunk kernels skipping the tiles the window and causal
    # masks cover wholly (triton) against running every tile (triton-all-tiles; the same bits),
    # 1024 queries over a full cache of 8192 keys, 3b's heads (32 x 80) and 125m's (12 x 64)
    timeout 280 python -m tttlm.cli bench kernel --heads 32 --head-dim 80 --batch 2 \
      --out "$OUT/kernel_chunk_attention_3b" || echo "kernel 3b: exit $?"
    timeout 280 python -m tttlm.cli bench kernel --out "$OUT/kernel_chunk_attention_125m_tiles" ;;
  speed)  # speed issue: 3b e2e prefill at 8K x 16 and 128K x 1 with the three chunk-attention
    # backends (auto: the Triton kernel; first-order; pieces), and full attention (flash and
    # cuDNN) beside them on the same card in the same call
    timeout 420 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 8192 131072 --compile compiled --attention auto first-order pieces \
      --paths model --repeats 2 --out "$OUT/prefill_speed_e2e_3b" || echo "e2e: exit $?"
    timeout 160 python -m tttlm.cli bench prefill --preset 3b --variants full \
      --lengths 8192 131072 --compile compiled --repeats 2 --out "$OUT/prefill_speed_full_3b" ;;
  first_order)  # speed issue: the first-order chunk attention (lower-right causal SDPA while
    # the cache fits the window, which is every chunk at 8K; flex once it is full) against the
    # Triton kernel, 3b e2e prefill (results/prefill_first_order_3b.md was before SDPA's part);
    # and `pieces` (first-order, plus the prefix blocks past the window as FlashAttention
    # pieces merged by log-sum-exp instead of flex_attention: only 128K differs)
    timeout 560 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 8192 131072 --compile compiled --attention auto first-order pieces \
      --paths model --repeats 2 --out "$OUT/prefill_first_order_sdpa_3b" ;;
  operands)  # speed issue: a frozen chunk's attention operands (RoPE of cache and chunk, the
    # values of cache + chunk, the next cache) as one Triton pass (after) against the compiled
    # concatenations (before: the tree before it at .before/src, made with
    # `mkdir .before && git archive 20eb58f src | tar -x -C .before` and carried); the kernel's
    # CUDA tests first, then 3b e2e prefill at 8K x 16 and 128K x 1 for each side
    # SIDES="name=src-folder ..." picks the trees compared (default: .before/src, then src)
    timeout 90 python -m pytest -q -p no:warnings tests/test_ops_triton_rope.py
    for pair in ${SIDES:-before=.before/src after=src}; do
      side=${pair%%=*} src=$PWD/${pair#*=}
      PYTHONPATH=$src timeout 230 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
        --lengths 8192 131072 --compile compiled --paths model --repeats 2 \
        --out "$SCRATCH/prefill_operands_3b_$side" | grep -v "^{" | tail -3
      cp "$SCRATCH/prefill_operands_3b_$side.json" "$OUT/" 2>/dev/null
    done
    timeout 100 python benchmarks/profile_step.py prefill:3b:e2e:8192:4:compiled \
      --out "$OUT/profile_prefill_3b_8k_operands" | head -14 ;;
  cudnn_chunks)  # speed issue: frozen TTT chunks as cuDNN pieces merged by log-sum-exp
    # (attention `pieces`) against FlashAttention's window (`auto`): their CUDA tests, the
    # kernels side by side, then 3b e2e prefill through both (one card, one call)
    timeout 120 python -m pytest -q -p no:warnings tests/test_ops_flash_window.py \
      tests/test_ops_attention_pieces.py | tail -3
    timeout 100 python benchmarks/attention_window.py --out "$OUT/attention_window_cudnn" \
      | grep -v '^ *"' || echo "attention_window: exit $?"
    for att in auto pieces; do
      timeout 170 python -m tttlm.cli bench prefill --preset 3b --compile compiled \
        --repeats 2 --variants e2e --lengths 8192 131072 --paths model --attention "$att" \
        --out "$SCRATCH/prefill_cudnn_chunks_$att" > /dev/null || echo "$att: exit $?"
      grep "^| [ef]" "$SCRATCH/prefill_cudnn_chunks_$att.md" 2>/dev/null
      cp "$SCRATCH/prefill_cudnn_chunks_$att.json" "$OUT/" 2>/dev/null
    done ;;
  graphs)  # speed issue: the model's default for CUDA graphs of the steady-state TTT chunk
    # (graph_chunks=None: one sequence, >= 32 replays; `--compile compiled`) against launching
    # every chunk's kernels (`--compile launched`), 3b at 8K x 16, 32K x 4 and 128K x 1, then
    # Engine.prefill at 128K x 1 with the default (one card, one call; H100 figures so far:
    # benchmarks/results/prefill_graphs_3b.md)
    timeout 150 python -m pytest -q -p no:warnings tests/test_model_chunk_graph.py \
      tests/test_inference_graphs.py | tail -3
    timeout 330 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 8192 32768 131072 --compile launched compiled --paths model --repeats 3 \
      --out "$SCRATCH/prefill_graphs_3b" > /dev/null || echo "bench: exit $?"
    grep "^| e" "$SCRATCH/prefill_graphs_3b.md" 2>/dev/null
    cp "$SCRATCH/prefill_graphs_3b.json" "$OUT/" 2>/dev/null
    timeout 120 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 131072 --compile compiled --paths engine --repeats 3 \
      --out "$SCRATCH/prefill_graphs_engine_3b" > /dev/null || echo "engine: exit $?"
    grep "^| e" "$SCRATCH/prefill_graphs_engine_3b.md" 2>/dev/null
    cp "$SCRATCH/prefill_graphs_engine_3b.json" "$OUT/" 2>/dev/null ;;
  session)  # speed issue, one call for a scarce machine, most needed first: the Triton
    # update kernels' CUDA tests; this tree's 3b e2e prefill (the model's defaults) at 8K x 16
    # and 128K x 1; full attention (flash and cuDNN) at 8K and 128K; then 128K x 1 for the
    # trees before the graph's in-place update (.mid/src: f54cf30) and before the Triton
    # update (.before/src: 2706de4), carried as in PART=descend
    timeout 100 python -m pytest -q -p no:warnings tests/test_ops_triton_descend.py \
      tests/test_model_chunk_graph.py | tail -3
    bench() {  # NAME SRC SECONDS ARGS...: one bench process, its table rows shown
      local name=$1 src=$2 each=$3; shift 3
      local left=$((${DEADLINE:-585} - SECONDS))  # (within one device command)
      [ "$left" -lt "$each" ] && each=$left
      [ "$each" -lt 30 ] && { echo "$name: no time left"; return; }
      PYTHONPATH=$PWD/$src timeout "$each" python -m tttlm.cli bench prefill --preset 3b \
        --compile compiled --paths model --repeats 2 --out "$SCRATCH/$name" "$@" > /dev/null \
        || echo "$name: exit $?"
      grep "^| [ef]" "$SCRATCH/$name.md" 2>/dev/null
      cp "$SCRATCH/$name.json" "$OUT/" 2>/dev/null
    }
    bench prefill_session_3b_e2e src 200 --variants e2e --lengths 8192 131072
    bench prefill_session_3b_full src 140 --variants full --lengths 8192 131072
    bench prefill_session_3b_mid .mid/src 120 --variants e2e --lengths 131072
    bench prefill_session_3b_before .before/src 120 --variants e2e --lengths 131072 ;;
  eager)  # speed issue: what this session left untimed, against the tree timed last
    # (.mid/src: `mkdir .mid && git archive cd62c99 src | tar -x -C .mid`, carried):
    # launched chunks writing the official SGD's updates into the run's own weights and their
    # bf16 copies (8K x 16 in TTT groups of 2, no graphs), and the head cast once per run
    # instead of twice a replay inside the chunk graph (128K x 1); one card, one call.
    # EACH caps one process's seconds, DEADLINE the whole part's
    for pair in before=.mid/src after=src; do
      side=${pair%%=*} src=$PWD/${pair#*=}
      left=$((${DEADLINE:-585} - SECONDS)); each=$(( left < ${EACH:-240} ? left : ${EACH:-240} ))
      PYTHONPATH=$src timeout "$each" python -m tttlm.cli bench prefill --preset 3b \
        --variants e2e --lengths 8192 131072 --compile compiled --paths model --repeats 2 \
        --out "$SCRATCH/prefill_eager_3b_$side" > /dev/null || echo "$side: exit $?"
      grep "^| e" "$SCRATCH/prefill_eager_3b_$side.md" 2>/dev/null
      cp "$SCRATCH/prefill_eager_3b_$side.json" "$OUT/" 2>/dev/null
    done ;;
  frozen)  # speed issue: a TTT chunk's backward over a frozen cache computing the cache's
    # share of dq only (`auto` on CUDA, and `frozen-dq`: FlashAttention's backward on the
    # chunk's own keys, a Triton kernel for the cache) against the flash window's full backward
    # (`flash-window`, what `auto` ran before):
    # the kernels side by side with tile configurations (each checked against the flash
    # window first), 3b e2e prefill at 8K x 16 and 128K x 1 through both (one card, one
    # call), then the CUDA tests
    timeout 100 python benchmarks/frozen_dq.py --out "$OUT/frozen_dq_3b" \
      --configs ${CONFIGS:-128,32,4,3 64,64,4,4 128,64,8,2} \
      | cut -c1-600 || echo "frozen_dq: exit $?"
    timeout 290 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 8192 131072 --compile compiled --attention flash-window auto --paths model \
      --repeats 2 --out "$SCRATCH/prefill_frozen_dq_3b" > /dev/null || echo "bench: exit $?"
    grep "^| e" "$SCRATCH/prefill_frozen_dq_3b.md" 2>/dev/null
    cp "$SCRATCH/prefill_frozen_dq_3b.json" "$OUT/" 2>/dev/null
    timeout 120 python -m pytest -q -p no:warnings tests/test_ops_frozen_dq.py | tail -3 ;;
  triton_fwd)  # speed issue: a frozen chunk's forward through the Triton kernel
    # (ops/triton_window_fwd.py, head width 80 = 64 + 16 unpadded; attention `triton-fwd`)
    # against FlashAttention's window forward (`auto`): the CUDA tests, the kernels side by
    # side per tile configuration, then 3b e2e prefill at 8K x 16 and 128K x 1 through both
    timeout 150 python -m pytest -q -p no:warnings tests/test_ops_triton_window_fwd.py \
      tests/test_ops_frozen_dq.py | tail -3
    timeout 120 python benchmarks/frozen_dq.py --out "$OUT/triton_fwd_3b" --configs \
      --fwd-configs ${FWD_CONFIGS:-128,64,8,2 128,32,4,3 64,32,4,3 64,64,4,4} \
      | cut -c1-900 || echo "frozen_dq: exit $?"
    timeout 290 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 8192 131072 --compile compiled --attention auto triton-fwd --paths model \
      --repeats 2 --out "$SCRATCH/prefill_triton_fwd_3b" > /dev/null || echo "bench: exit $?"
    grep "^| e" "$SCRATCH/prefill_triton_fwd_3b.md" 2>/dev/null
    cp "$SCRATCH/prefill_triton_fwd_3b.json" "$OUT/" 2>/dev/null ;;
  frozen_triton)  # speed issue: a frozen chunk's own keys' backward through Triton too
    # (ops/triton_own_dkdv.py for dk, dv; their dq folded into the cache's dq kernel;
    # attention `frozen-triton`) against FlashAttention's backward on those keys (`auto`):
    # the CUDA tests, the kernels (each checked against the flash window first), then 3b e2e
    # prefill at 8K x 16 and 128K x 1 through `flash-window`, `auto` and `frozen-triton`
    timeout 150 python -m pytest -q -p no:warnings tests/test_ops_triton_own_dkdv.py \
      tests/test_ops_frozen_dq.py tests/test_ops_triton_window_fwd.py | tail -3
    timeout 120 python benchmarks/frozen_dq.py --out "$OUT/frozen_triton_3b" --configs \
      --fwd-configs --own-configs ${OWN_CONFIGS:-64,32,4,3 128,64,8,2 32,64,4,3} \
      | cut -c1-1200 || echo "frozen_dq: exit $?"
    timeout 330 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 8192 131072 --compile compiled --paths model --repeats 2 \
      --attention flash-window auto frozen-triton \
      --out "$SCRATCH/prefill_frozen_triton_3b" > /dev/null || echo "bench: exit $?"
    grep "^| e" "$SCRATCH/prefill_frozen_triton_3b.md" 2>/dev/null
    cp "$SCRATCH/prefill_frozen_triton_3b.json" "$OUT/" 2>/dev/null ;;
  own_dkdv)  # speed issue: the own keys' dk, dv kernel with the scores formed keys by
    # queries (no register transposes: benchmarks/results/kernel_sm90_cpu.md) against the
    # tree before (`mkdir .before && git archive ad99fda src | tar -x -C .before`, carried):
    # each side's kernels alone (frozen_dq.py checks each path against FlashAttention's window
    # first, then times the own kernel for each of OWN_CONFIGS), then 3b e2e prefill through
    # `triton-fwd` (FlashAttention's backward on the own keys: `auto` before 35ab9e1) and
    # `frozen-triton` (`auto` since) and full attention, one card, one call (~9 min); the CUDA
    # tests last
    for side in before after; do
      src=src; [ $side = before ] && src=.before/src
      PYTHONPATH=$src timeout 100 python benchmarks/frozen_dq.py --out "$OUT/own_dkdv_$side" \
        --configs --fwd-configs --own-configs ${OWN_CONFIGS:-64,64,4,3 128,64,8,3 64,32,4,3} \
        | grep -v '^ *"' | cut -c1-900 | tail -30 || echo "frozen_dq $side: exit $?"
    done
    final_row own_e2e 260 --variants e2e --lengths 8192 131072 --paths model \
      --attention triton-fwd frozen-triton
    final_row own_full 130 --variants full --lengths 8192 131072
    timeout 60 python -m pytest -p no:warnings -rf tests/test_ops_triton_own_dkdv.py \
      | tail -3 ;;
  pairs)  # speed issue: 3b e2e prefill at LENGTHS (default 128K x 1) for the tree before and
    # this one, interleaved (before, after, before, after: machines drift), one process each:
    # the tree before carried as .mid/src (`mkdir .mid && git archive COMMIT src | tar -x -C
    # .mid`). Measured so: the cache's rows of dk, dv left unwritten (0721125 -> 0889b64,
    # prefill_final_3b_h100_2026-12-07.md section 3). Owed: no zero gradient for the kept
    # raw keys (f44db3a -> this tree with TTTLM_CACHE_SWAP=0 exported: one change a side)
    for pair in before=.mid/src after=src before2=.mid/src after2=src; do
      side=${pair%%=*}
      PYTHONPATH=$PWD/${pair#*=} timeout "${EACH:-70}" python -m tttlm.cli bench prefill \
        --preset 3b --compile compiled --repeats 2 --variants e2e --lengths ${LENGTHS:-131072} \
        --paths model --out "$OUT/pairs_$side" > /dev/null || echo "$side: exit $?"
      grep "^| e" "$OUT/pairs_$side.md" | cut -d'|' -f7,11
    done ;;
  cache_swap)  # speed issue: the chunk graph's caches in two buffer sets (a065aef: the
    # operands write the next caches into the set not read, no copy per chunk) against one
    # set copied into (TTTLM_CACHE_SWAP=0), one tree: the CUDA tests first, then 3b e2e
    # prefill at 128K x 1 (graphs), interleaved, one process each (~5 min)
    timeout 150 python -m pytest -p no:warnings -rf tests/test_model_chunk_graph.py \
      tests/test_ops_triton_rope.py tests/test_ops_frozen_dq.py 2>&1 | tail -4
    for pair in one=0 two=1 one2=0 two2=1; do
      side=${pair%%=*}
      TTTLM_CACHE_SWAP=${pair#*=} timeout "${EACH:-70}" python -m tttlm.cli bench prefill \
        --preset 3b --compile compiled --repeats 2 --variants e2e --lengths 131072 \
        --paths model --out "$OUT/cache_swap_$side" > /dev/null || echo "$side: exit $?"
      grep "^| e" "$OUT/cache_swap_$side.md" | cut -d'|' -f7,11,15
    done ;;
  inductor)  # speed issue: Inductor's coordinate-descent tuning of its own kernels (the
    # norms, casts and reductions around the TTT chunk's matmuls: 266 ms in 17686 launches of
    # a 128K step, prefill_own_dkdv_3b_h100.md section 3) against its default configs, one
    # tree: 3b e2e prefill at LENGTHS (default 128K x 1), interleaved, one process each
    # (SIDES: which runs, name=0|1 for the tuning off or on)
    for pair in ${SIDES:-plain=0 tuned=1 plain2=0 tuned2=1}; do
      side=${pair%%=*}
      TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=${pair#*=} timeout "${EACH:-150}" python -m \
        tttlm.cli bench prefill --preset 3b --compile compiled --repeats 2 --variants e2e \
        --lengths ${LENGTHS:-131072} --paths model --out "$OUT/inductor_$side" > /dev/null \
        || echo "$side: exit $?"
      grep "^| e" "$OUT/inductor_$side.md" | cut -d'|' -f7,11,15
    done ;;
  settle)  # speed issue: the window forward's whole key tiles shifted by a value settled
    # after a query tile's first (TTTLM_WINDOW_SETTLE, log2 units above that tile's maxima;
    # 0: the running maximum; 48 the default since prefill_settle_3b_h100.md, bf16 and fp32
    # only: fp16 keeps the running maximum whatever it says), which drops the maxima and the
    # accumulators' rescaling (kernel_sm90_settle_cpu.md: 588 -> 401 instructions a tile at
    # 4 warps, the spills outside that loop; 357 -> 252 at 8 warps, none): 3b e2e prefill at
    # LENGTHS (default 128K x 1; 8192 for 8K x 16), one process a side, interleaved, then its
    # CUDA tests with it on.
    # SIDES: name=SETTLE:BM,BN,WARPS,STAGES (the chunk's and the whole sequence's tiles)
    for side in ${SIDES:-base=0:128,64,4,3 s48w8=48:128,64,8,3 s48=48:128,64,4,3 \
                  base2=0:128,64,4,3}; do
      name=${side%%=*} spec=${side#*=}
      tiles=${spec#*:}
      TTTLM_WINDOW_SETTLE=${spec%%:*} TTTLM_WINDOW_FWD=$tiles TTTLM_WINDOW_SEQ=$tiles \
        timeout "${EACH:-140}" python -m tttlm.cli bench prefill --preset 3b --compile \
        compiled --repeats 2 --variants e2e --lengths ${LENGTHS:-131072} --paths model \
        --out "$SCRATCH/settle_$name" > /dev/null || echo "$name: exit $?"
      grep "^| e" "$SCRATCH/settle_$name.md" 2>/dev/null | cut -d'|' -f7,11,15
      cp "$SCRATCH/settle_$name.json" "$OUT/settle_${name}_${LENGTHS:-131072}.json" 2>/dev/null
    done
    # the tests last: a call cut at its limit keeps the timings
    if [ "${TESTS:-150}" != 0 ]; then  # (TESTS: their time limit, 0 to skip them)
      TTTLM_WINDOW_SETTLE=48 timeout "${TESTS:-150}" python -m pytest -p no:warnings -rf \
        tests/test_ops_triton_window_fwd.py tests/test_ops_window_sequence.py 2>&1 | tail -3
    fi ;;
  norms)  # speed issue: the inner gradient's 24 per-tensor norms of a 3b chunk, one ATen
    # reduction each (what runs) against one torch._foreach_norm pass, then the chunk graph's
    # and the operands pass's CUDA tests the cache_swap call could not finish in its limit
    timeout 60 python benchmarks/inner_norms.py --out "$OUT/inner_norms_3b"
    timeout 200 python -m pytest -p no:warnings -rf tests/test_ops_triton_rope.py \
      tests/test_model_chunk_graph.py tests/test_ops_frozen_dq.py -k "cuda or swap or pass" \
      2>&1 | tail -5 ;;
  next)  # speed issue, the next session's first call (one warm machine, ~6 minutes): the
    # card and versions, then the targets' table (PART=final, BASELINE=0): on an H200 the
    # table the targets are stated for; on an H100 another machine's, for the spread of the
    # thin margins of prefill_settle_3b_h100.md (0.2-0.6%). Then, on an H200, PART=train.
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    python -c "import torch, triton; print(torch.__version__, triton.__version__, \
      torch.version.cuda, torch.backends.cudnn.version())"
    OUT="$OUT" PART=final BASELINE=0 bash "$0" ;;
  train_kernel)  # speed issue: tttlm train 125m e2e at 8K (micro-batch 4: 8 does not fit an
    # H100) with the meta-training chunk kernels' key-block tiles keys by queries (f9add3b)
    # against the tree before (`mkdir .before && git archive ad99fda src | tar -x -C .before`,
    # carried), one process per side
    for side in before after; do
      src=$PWD/src; [ $side = before ] && src=$PWD/.before/src
      PYTHONPATH=$src timeout 130 python benchmarks/train_cli.py --preset 125m-8k --batch 16 \
        --micro-batch 4 --steps 5 --skip 2 --runs e2e:compiled-graph \
        --out "$OUT/train_kernel_125m_8k_$side" | tail -1 || echo "train $side: exit $?"
    done ;;
  prefix_merge)  # speed issue: the prefix blocks' window edge reversed by a compiled copy
    # and merged in one compiled pass (ops/attention/pieces.py) against ATen's flips and the
    # eager merge: the tree before, carried as .before/src (`mkdir .before && git archive
    # 4dbe236 src | tar -x -C .before`), and src; the pieces' CUDA tests, then 3b e2e prefill
    # at 32K x 4 and 128K x 1 for each tree (8K has no block past the window), one card
    timeout 120 python -m pytest -q -p no:warnings tests/test_ops_attention_pieces.py | tail -3
    for pair in ${SIDES:-before=.before/src after=src}; do
      side=${pair%%=*} src=$PWD/${pair#*=}
      PYTHONPATH=$src timeout 200 python -m tttlm.cli bench prefill --preset 3b \
        --variants e2e --lengths 32768 131072 --compile compiled --paths model --repeats 2 \
        --out "$SCRATCH/prefill_prefix_merge_3b_$side" > /dev/null || echo "$side: exit $?"
      grep "^| e" "$SCRATCH/prefill_prefix_merge_3b_$side.md" 2>/dev/null
      cp "$SCRATCH/prefill_prefix_merge_3b_$side.json" "$OUT/" 2>/dev/null
    done ;;
  window_sequence)  # speed issue: the prefix blocks' whole-sequence window through the Triton
    # window pass (ops/attention/window_sequence.py, `auto`) against cuDNN (`cudnn-sequence`):
    # the CUDA tests, one block's attention per tile, then 3b e2e prefill at 8K x 16, 32K x 4
    # and 128K x 1 through both (about 5 minutes)
    timeout 100 python -m pytest -q -p no:warnings tests/test_ops_window_sequence.py \
      tests/test_ops_triton_window_fwd.py | tail -3
    timeout 120 python benchmarks/window_sequence.py --out "$OUT/window_sequence_3b" \
      --fwd-configs 64,32,4,3 128,64,8,3 128,32,8,3 64,64,4,3 | cut -c1-1200 \
      || echo "window_sequence: exit $?"
    timeout 330 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 8192 32768 131072 --compile compiled --paths model --repeats 2 \
      --attention cudnn-sequence auto --out "$SCRATCH/prefill_window_sequence_3b" > /dev/null \
      || echo "bench: exit $?"
    grep "^| e" "$SCRATCH/prefill_window_sequence_3b.md" 2>/dev/null
    cp "$SCRATCH/prefill_window_sequence_3b.json" "$OUT/" 2>/dev/null ;;
  capture)  # speed issue: what capturing the steady-state chunk's CUDA graph costs a prefill
    # (once per forward call; the 128K step's GPU was busy 91% of its wall time), then a
    # profile of this tree at 128K x 1 (about 5 minutes)
    timeout 300 python benchmarks/graph_capture.py 131072:1 32768:4 \
      --out "$OUT/graph_capture_3b" | cut -c1-1500 || echo "graph_capture: exit $?"
    timeout 200 python benchmarks/profile_step.py prefill:3b:e2e:131072:1:compiled:graphed \
      --out "$OUT/profile_prefill_3b_128k.json" | head -30 || echo "profile: exit $?" ;;
  rope)  # speed issue: the compiled RoPE in one pass (ops/rope.py; 0b51f8c) and a block's
    # normed input cast once for its products without gradient (model/layers.products_input)
    # against the tree before both, carried as .before/src (`mkdir .before && git archive
    # 2bc4c2c src | tar -x -C .before`): 3b e2e prefill at 8K x 16 and 128K x 1 and tttlm
    # train 125m at 8K for each side, alternating, then a profile of this tree at 128K (the
    # prefix blocks' QK-norm + RoPE kernel took 3.4 ms a block before; about 6 minutes)
    for side in before after; do
      src=$PWD/src; [ $side = before ] && src=$PWD/.before/src
      PYTHONPATH=$src timeout 200 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
        --lengths 8192 131072 --compile compiled --paths model --repeats 2 \
        --out "$SCRATCH/prefill_rope_3b_$side" > /dev/null || echo "prefill $side: exit $?"
      grep "^| e" "$SCRATCH/prefill_rope_3b_$side.md" 2>/dev/null
      cp "$SCRATCH/prefill_rope_3b_$side.json" "$OUT/" 2>/dev/null
      # (micro-batch 8 fits an H200; an 80 GB H100 ran out of memory there: MB=4)
      PYTHONPATH=$src timeout 90 python benchmarks/train_cli.py --preset 125m-8k --batch 16 \
        --micro-batch "${MB:-8}" --steps 5 --skip 2 --runs e2e:compiled-graph \
        --out "$OUT/train_cli_125m_8k_rope_$side" || echo "train $side: exit $?"
    done
    timeout 150 python benchmarks/profile_step.py prefill:3b:e2e:131072:1:compiled:graphed \
      --top 40 --out "$OUT/profile_prefill_3b_128k_rope.json" > "$SCRATCH/profile.txt" 2>&1 \
      || echo "profile: exit $?"
    head -16 "$SCRATCH/profile.txt" ;;
  fold)  # speed issue, three changes against the tree before them, carried as .mid/src
    # (`mkdir .mid && git archive a51e066 src | tar -x -C .mid`): the Triton window forward's
    # softmax with the scale folded into the shift and accumulating products (unmasked
    # tiles; the whole sequences' kernel timed alone by window_sequence.py); the inner step's
    # head work over the logits as one Triton kernel (ops/triton_head_nll.py; alone by
    # head_nll.py); a run's first update written in place like the others, so the host never
    # waits for one (host_gap.py's timeline: the eager chunks while the caches fill). For
    # each side: the timeline and step time at 128K x 1, the window kernel, 3b e2e prefill
    # at 8K x 16 (about 8 minutes)
    timeout 60 python benchmarks/head_nll.py --out "$OUT/head_nll_3b" > /dev/null \
      || echo "head_nll: exit $?"
    for pair in before=.mid/src after=src; do
      side=${pair%%=*} src=$PWD/${pair#*=}
      PYTHONPATH=$src timeout 170 python benchmarks/host_gap.py 131072:1 --repeats 2 \
        --out "$OUT/host_gap_3b_128k_$side" > /dev/null || echo "host_gap $side: exit $?"
      PYTHONPATH=$src timeout 60 python benchmarks/window_sequence.py --repeats 5 \
        --fwd-configs 128,64,4,3 --out "$OUT/window_sequence_fold_$side" > /dev/null \
        || echo "window_sequence $side: exit $?"
      PYTHONPATH=$src timeout 100 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
        --lengths 8192 --compile compiled --paths model --repeats 2 \
        --out "$SCRATCH/prefill_fold_3b_$side" > /dev/null || echo "prefill $side: exit $?"
      grep "^| e" "$SCRATCH/prefill_fold_3b_$side.md" 2>/dev/null
      cp "$SCRATCH/prefill_fold_3b_$side.json" "$OUT/" 2>/dev/null
    done ;;
  kept_kernels)  # speed issue: the CUDA tests of the kernels reading through descriptors
    # and of the kept chunk graph, the kernels by tile and read path (kv_descriptors.py), and
    # 3b e2e at 128K x 1 before the kept graph (.before/src: git archive f7a33e2, carried);
    # about 5 minutes
    timeout 200 python -m pytest -q -x tests/test_ops_triton_window_fwd.py \
      tests/test_ops_window_sequence.py tests/test_ops_frozen_dq.py \
      tests/test_ops_triton_own_dkdv.py tests/test_model_chunk_graph.py \
      tests/test_ops_triton_head_nll.py 2>&1 | tail -3
    timeout 150 python benchmarks/kv_descriptors.py --out "$OUT/kv_descriptors_3b" \
      --fwd-configs 128,64,4,3 128,64,4,2 128,128,8,2 64,64,4,3 \
      --dq-configs 64,64,4,3 128,64,4,3 128,64,8,2 | cut -c1-170
    PYTHONPATH=.before/src timeout 120 python -m tttlm.cli bench prefill --preset 3b \
      --variants e2e --lengths 131072 --compile compiled --paths model --repeats 2 \
      --out "$OUT/prefill_128k_before" > /dev/null || echo "before: exit $?"
    grep "^| e" "$OUT/prefill_128k_before.md" ;;
  kept_prefill)  # speed issue: 3b e2e at 128K x 1 with the kept chunk graph, descriptors off
    # and on (TTTLM_KV_DESC=0|1: 1 opted in then; descriptors are the default since), then 32K x 4; right after PART=kept_kernels on the
    # same machine; about 5 minutes
    for desc in 0 1; do
      TTTLM_KV_DESC=$desc timeout 120 python -m tttlm.cli bench prefill --preset 3b \
        --variants e2e --lengths 131072 --compile compiled --paths model --repeats 2 \
        --out "$OUT/prefill_128k_desc$desc" > /dev/null || echo "desc $desc: exit $?"
      grep "^| e" "$OUT/prefill_128k_desc$desc.md"
    done
    timeout 120 python -m tttlm.cli bench prefill --preset 3b --variants e2e \
      --lengths 32768 --compile compiled --paths model --repeats 2 \
      --out "$OUT/prefill_32k" > /dev/null || echo "32k: exit $?"
    grep "^| e" "$OUT/prefill_32k.md" ;;
  census)  # speed issue: why the first launched chunks of a 128K x 1 step wait ~1.4 s on the
    # host (host_gap.py: the timeline, the allocator's device allocations, frees and retries,
    # and the longest CUDA runtime calls with their tttlm frames), then 3b e2e at 128K x 1 as
    # is and with the allocator's expandable segments (fewer device frees if the cache is
    # fragmented); about 5 minutes
    timeout 200 python benchmarks/host_gap.py 131072:1 --repeats 2 \
      --out "$OUT/host_gap_census_3b_128k" > /dev/null || echo "host_gap: exit $?"
    for conf in "" "expandable_segments:True"; do
      PYTORCH_CUDA_ALLOC_CONF=$conf timeout 120 python -m tttlm.cli bench prefill --preset 3b \
        --variants e2e --lengths 131072 --compile compiled --paths model --repeats 2 \
        --out "$OUT/prefill_128k_alloc_${conf%%:*}" > /dev/null || echo "alloc $conf: exit $?"
      grep "^| e" "$OUT/prefill_128k_alloc_${conf%%:*}.md"
    done ;;
  fill)  # speed issue: graphs of the chunks while the caches fill (one per length, made by
    # a run that repeats the last one's shapes, kept with the steady graph), all in one call
    # for a scarce machine, most needed first: the CUDA tests of the chunk graphs, 3b e2e at
    # 128K x 1 before (.before/src: git archive 8de2333, carried), the targets' table after
    # (PART=final BASELINE=0 GRAPHED=1, whose e2e row at 128K is the after), then where an
    # after step goes (host_gap.py); about 9 minutes
    timeout 150 python -m pytest -q -x tests/test_model_chunk_graph.py \
      tests/test_ops_triton_kv.py 2>&1 | tail -3
    PYTHONPATH=$PWD/.before/src timeout 100 python -m tttlm.cli bench prefill --preset 3b \
      --variants e2e --lengths 131072 --compile compiled --paths model --repeats 2 \
      --out "$SCRATCH/prefill_128k_before" > /dev/null || echo "before: exit $?"
    grep "^| e" "$SCRATCH/prefill_128k_before.md"
    cp "$SCRATCH/prefill_128k_before.json" "$OUT/" 2>/dev/null
    PART=final BASELINE=0 GRAPHED=1 bash "$0"
    timeout 150 python benchmarks/host_gap.py 131072:1 --repeats 2 \
      --out "$SCRATCH/host_gap_fill_3b_128k" > /dev/null || echo "host_gap: exit $?"
    cp "$SCRATCH/host_gap_fill_3b_128k.json" "$OUT/" 2>/dev/null ;;
  lean)  # speed issue: PART=fill for what little device time is left, the most needed
    # first, each report kept as soon as written: the CUDA tests of the chunk graphs, 3b e2e
    # at 128K x 1 before (.before/src: git archive 8de2333, carried) and after, full attention
    # at 128K, then e2e at 8K x 16 and 32K x 4, full at 8K, Engine.prefill at 128K
    timeout 100 python -m pytest -q -x tests/test_model_chunk_graph.py 2>&1 | tail -2
    PYTHONPATH=$PWD/.before/src final_row before 100 --variants e2e --lengths 131072 \
      --paths model
    final_row after 100 --variants e2e --lengths 131072 --paths model
    final_row full128 100 --variants full --lengths 131072
    final_row e2e_short 120 --variants e2e --lengths 8192 32768 --paths model
    final_row full8 60 --variants full --lengths 8192
    final_row engine 100 --variants e2e --lengths 131072 --paths engine ;;
  one_sequence)  # speed issue: what the graphs of the filling chunks give a one-sequence
    # prompt up to the window (8K at 3b: every whole chunk but the last fills the caches),
    # the scoring forward and Engine.prefill, graphs by default (made by the second warm-up)
    # against none (--compile launched); then 128K x 1 likewise; about 4 minutes
    for len in 8192 131072; do
      final_row "one_${len}" 150 --variants e2e --lengths "$len" --batch 1 \
        --paths model engine --compile compiled launched
    done ;;
  timeline)  # speed issue: PART=fold's timelines alone (host_gap.py at 128K x 1, before
    # and after, .mid/src carried as there; about 4 minutes)
    for pair in before=.mid/src after=src; do
      side=${pair%%=*} src=$PWD/${pair#*=}
      PYTHONPATH=$src timeout 170 python benchmarks/host_gap.py 131072:1 --repeats 2 \
        --out "$OUT/host_gap_3b_128k_$side" > /dev/null || echo "host_gap $side: exit $?"
    done ;;
  head)  # speed issue: the inner step's head products at 3b's shapes, as called and
    # transposed, with their kernels (about a minute)
    timeout 120 python benchmarks/head_matmul.py --out "$OUT/head_matmul_3b" \
      || echo "head_matmul: exit $?" ;;
  final)  # speed issue: the targets' table in one call on one card: 3b e2e prefill with the
    # model's defaults at 8K x 16, 32K x 4 and 128K x 1, full attention (flash and cuDNN, the
    # faster counts) at 8K and 128K, Engine.prefill (what tttlm generate runs) at 128K, and
    # (BASELINE=0 to skip) e2e through `flash-window` at 8K and 128K; about 6 minutes. Each
    # report's rows are printed and its JSON kept as soon as it is written (a call cut at its
    # limit keeps what ran).
    final_row e2e 290 --variants e2e --lengths 8192 32768 131072 --paths model
    final_row full 150 --variants full --lengths 8192 131072
    final_row engine 120 --variants e2e --lengths 131072 --paths engine
    # the frozen chunks through FlashAttention's own window forward and backward, as `auto`
    # ran them before the Triton kernels: the same call's baseline (machines of one kind
    # differ by up to 10% on e2e, benchmarks/results/frozen_dq_3b_h100.md section 6)
    if [ "${BASELINE:-1}" = 1 ]; then
      final_row flash_window 150 --variants e2e --lengths 8192 131072 --paths model \
        --attention flash-window
    fi
    # (GRAPHED=1) 8K x 16 and 32K x 4 with chunk graphs forced (later arguments win): in
    # TTT groups of several sequences the default takes none; kept graphs of every chunk
    # may change that
    if [ "${GRAPHED:-0}" = 1 ]; then
      final_row graphed 150 --variants e2e --lengths 8192 32768 --paths model \
        --compile graphed
    fi ;;
  descend)  # speed issue: the inner update as one Triton pass (ops/triton_descend.py),
    # then written into the chunk graph's buffers with their bf16 copies (triton_descend_),
    # against ATen's addcmul: three trees, carried as .before/src (addcmul: `mkdir .before &&
    # git archive 2706de4 src | tar -x -C .before`) and .mid/src (the Triton pass: f54cf30),
    # and src. The kernels' CUDA tests, then 3b e2e prefill at 128K x 1 for each tree
    # (the default: chunk graphs there), one card, one call
    timeout 100 python -m pytest -q -p no:warnings tests/test_ops_triton_descend.py \
      tests/test_model_chunk_graph.py | tail -3
    for pair in before=.before/src mid=.mid/src after=src; do
      side=${pair%%=*} src=$PWD/${pair#*=}
      PYTHONPATH=$src timeout 130 python -m tttlm.cli bench prefill --preset 3b \
        --variants e2e --lengths 131072 --compile compiled --paths model --repeats 2 \
        --out "$SCRATCH/prefill_descend_3b_$side" > /dev/null || echo "$side: exit $?"
      grep "^| e" "$SCRATCH/prefill_descend_3b_$side.md" 2>/dev/null
      cp "$SCRATCH/prefill_descend_3b_$side.json" "$OUT/" 2>/dev/null
    done
    # then where an 8K x 16 step goes now (no graphs there: 16 sequences)
    timeout 110 python benchmarks/profile_step.py prefill:3b:e2e:8192:16:compiled \
      --out "$OUT/profile_prefill_3b_8k16.json" | head -16 ;;
  flash)  # speed issue: frozen TTT chunks through FlashAttention's window and the prefix
    # blocks past their window as two batched cuDNN pieces (attention `pieces`): their CUDA
    # tests, then 3b e2e prefill against the tree before them (.mid/src, made with
    # `mkdir .mid && git archive d3fe354 src | tar -x -C .mid` and carried), full attention
    # beside them (one card, one call)
    timeout 100 python -m pytest -q -p no:warnings tests/test_ops_flash_window.py \
      tests/test_ops_attention_pieces.py tests/test_ops_flex_chunk.py | tail -3
    run() {  # NAME SRC SECONDS ARGS...: one bench process, its JSON copied to $OUT
      local name=$1 src=$2 each=$3; shift 3
      PYTHONPATH=$PWD/$src timeout "$each" python -m tttlm.cli bench prefill --preset 3b \
        --compile compiled --repeats 2 --out "$SCRATCH/$name" "$@" > /dev/null \
        || echo "$name: exit $?"
      grep "^| [ef]" "$SCRATCH/$name.md" 2>/dev/null
      cp "$SCRATCH/$name.json" "$OUT/" 2>/dev/null
    }
    run prefill_flash_3b_before .mid/src 130 --variants e2e --lengths 8192 131072 --paths model
    run prefill_flash_3b_after src 190 --variants e2e --lengths 8192 32768 131072 --paths model
    run prefill_flash_3b_pieces src 80 --variants e2e --lengths 131072 --attention pieces
    run prefill_flash_3b_full src 110 --variants full --lengths 8192 131072 ;;
  prefill_small)  # speed issue: Engine.prefill of a small model (launch-bound per chunk), with
    # and without the engine's CUDA graphs (the inner step replayed once the caches are full)
    timeout 560 python -m tttlm.cli bench prefill --preset 125m --variants e2e \
      --lengths 32768 131072 --batch 1 --paths model engine engine-graphs --repeats 2 \
      --out "$OUT/prefill_engine_graphs_125m" ;;
  groups)  # speed issue: 3b e2e prefill memory and speed at 8K x 16 by TTT group size
    timeout 560 python -m tttlm.cli bench prefill --preset 3b --variants e2e --lengths 8192 \
      --compile compiled --ttt-groups all 8 4 2 --repeats 2 --out "$OUT/prefill_groups_3b_8k" ;;
  recall)  # retrieval issue: the request cost of rag=end with the FTS5 index, beside full
    timeout "${LIMIT:-560}" python benchmarks/recall_latency.py --preset 760m --variants e2e full \
      --contexts 8192 32768 131072 --new-tokens 128 --requests 3 --profile \
      --out "$OUT/recall_latency_760m_fts5" ;;
  recall_smol)  # retrieval issue: where SmolLM2 e2e's time to the first token goes (reading
    # the quoted passages); the timing does not depend on the weights, so the converted models
    # serve (no fine-tune); the GGUF as for `finetune`
    W=/tmp/smol-lat; G=.gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f $W/full/config.json ] || python -m tttlm.cli convert hf $G $W/full > /dev/null &
    [ -f $W/e2e/config.json ] || python -m tttlm.cli convert hf $G $W/e2e --to e2e \
      --window 1024 --chunk 128 --seed 0 > /dev/null &
    wait
    timeout "${LIMIT:-360}" python benchmarks/recall_latency.py --model $W/e2e --model $W/full \
      --contexts 32768 --new-tokens 128 --requests 3 --profile \
      --out "$OUT/recall_latency_smollm2_profile"
    for graphs in "" --cuda-graphs; do  # NIAH's speed with and without the engine's graphs
      start=$SECONDS
      timeout 120 python -m tttlm.cli eval niah --model $W/e2e --lengths 8192 --samples 2 \
        --kinds passkey,number --depths 0.25,0.75 --batch-size 8 --device cuda --quiet \
        --no-plots $graphs --out "$W/niah$graphs" > /dev/null
      echo "niah 8K x 8 ${graphs:-eager}: exit $?, $((SECONDS - start)) s" | tee -a "$OUT/niah_speed.txt"
    done ;;
  serve)  # serving issue: 64 sessions of 32K context, e2e vs full (disk: full's sessions are
          # 4x larger, so it gets fewer)
    timeout 270 python benchmarks/serve_load.py --preset 125m --variant e2e --context 32768 \
      --dtype bfloat16 --sessions 64 --in-memory 64 --max-batch 64 --tokens 64 --rounds 2 --device cuda \
      --out "$OUT" --name serve_gpu_125m_e2e_32k
    timeout 270 python benchmarks/serve_load.py --preset 125m --variant full --context 32768 \
      --dtype bfloat16 --sessions 16 --in-memory 16 --max-batch 64 --tokens 64 --rounds 2 --device cuda \
      --out "$OUT" --name serve_gpu_125m_full_32k ;;
  variants)  # baselines issue: the paper's speed figure, all seven variants at 3b (one process
    # each, so a variant that fails or overruns leaves the others' rows; about 60-100 s each on
    # an H200: split the list over two calls with VARIANTS="...")
    # shellcheck disable=SC2086
    prefill_each 140 ${VARIANTS:-ttt_kvb gated_deltanet mamba2 hybrid e2e swa full} ;;
  decode)  # baselines issue: decode latency of all seven at 760m
    timeout "${LIMIT:-560}" python -m tttlm.cli bench decode --presets 760m \
      --variants ${VARIANTS:-e2e swa full hybrid ttt_kvb gated_deltanet mamba2} \
      --contexts 8192 131072 --modes graph --repeats 2 --out "$SCRATCH/decode_variants_760m" \
      && cp "$SCRATCH/decode_variants_760m.json" "$OUT/" ;;
  compare)  # baselines issue: the small same-tokens training comparison (12 blocks of width
    # 512, 5:1 mixes), each variant trained and evaluated on the same held-out windows in its own
    # process (a graphed step keeps its memory pool until exit), so a cut call keeps the variants
    # done; merge_reports.py small joins them. On Hopper, fla 0.6 refuses the gated backward
    # under Triton < 3.7.1 (wrong results, fla #640): gated_deltanet and mamba2 need a newer
    # Triton (or tilelang) to train there.
    for v in ${VARIANTS:-e2e swa full hybrid ttt_kvb gated_deltanet mamba2}; do
      timeout "${LIMIT:-540}" python benchmarks/variants_small.py --size gpu --device cuda \
        --steps "${STEPS:-100}" --work /tmp/variants-small --variants "$v" \
        --out "$SCRATCH/variants_small_h200_$v" | grep '"train_s"'
      cp "$SCRATCH/variants_small_h200_$v.json" "$OUT/" 2>/dev/null
    done ;;
  sessions)  # serving issue: per-reply session saves on the GPU (device -> host copy, hashing)
    timeout 560 python benchmarks/session_save.py --preset 125m --dtype bfloat16 --replies 4 \
      --tokens 64 --out "$OUT" --name session_save_125m_h200 ;;
  finetune)  # pretrained-models issue: (a)-(d) from SmolLM2-135M, loss by position to 8K
    # shellcheck disable=SC2086
    timeout "${LIMIT:-570}" python benchmarks/finetune_experiment.py \
      --source .gguf/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/smol-exp \
      --steps "${STEPS:-40}" --batch-size 8 --seq-len 8192 --eval-sequences 32 --device cuda \
      --niah 2048,4096,8192,16384 --niah-kinds passkey,number,uuid --niah-depths 0.25,0.75 \
      --niah-samples 4 --niah-batch-size 24 --rag-separator "\\n\\n" ${FINETUNE_ARGS:-} --out "$OUT" --name finetune_smollm2_h200 ;;
    # FINETUNE_ARGS="--rag-horizon 128" adds the retrieval rows with the shorter recall
    # horizon (own folder in --work, so the default rows stay; measured:
    # results/finetune_smollm2_h200_horizon128.md).
  *) echo "PART=$PART: use train, prefill, traffic, kernel, speed, operands, flash, cudnn_chunks, graphs, descend, final, kept_kernels, kept_prefill, census, fill, lean, one_sequence, session, eager, frozen, triton_fwd, frozen_triton, own_dkdv, train_kernel, pairs, cache_swap, inductor, settle, norms, next, prefix_merge, window_sequence, capture, rope, fold, head, first_order, prefill_small, groups, recall, recall_smol, serve," \
       "variants, decode, compare," \
       "sessions or finetune" >&2
     exit 2 ;;
esac
