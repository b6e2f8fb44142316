# Before/after timings on one GPU, in one run: BEFORE_SRC (an earlier tree's src, e.g. from
# `git archive REV src | tar -x -C .before`, then .before/src) against this tree's src.
# Usage: ROOT=$PWD BEFORE_SRC=.before/src OUT=dir PART=prefill|decode-train bash THIS
# PART=prefill: prefill 3b at 8K and 128K (compiled blocks, 128K tokens per step); the current tree
#   also times Engine.prefill (--paths model engine).
# PART=decode-train: decode 760m at 8K and 128K with CUDA graphs; meta-training 125m 8K as one
#   CUDA-graph step (the fastest bench train mode).
# Each side runs in its own process; the sides alternate so that clock drift hits both alike.
set -u
export PYTHONUNBUFFERED=1
cd /tmp
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
for side in before after; do
  if [ $side = before ]; then src=$ROOT/$BEFORE_SRC; paths=""; else src=$ROOT/src; paths="--paths model engine"; fi
  if [ "$PART" = prefill ]; then
    for len in 8192 131072; do
      echo "=== $side prefill 3b $len compiled"
      PYTHONPATH=$src timeout 240 python3 -m tttlm.cli bench prefill --preset 3b --variants e2e \
        --lengths $len --compile compiled --repeats 3 $paths --out $OUT/prefill_3b_${len}_$side 2>&1 \
        | grep -v "^{" | tail -4
    done
  else
    echo "=== $side decode 760m 8K 128K graph"
    PYTHONPATH=$src timeout 150 python3 -m tttlm.cli bench decode --presets 760m --variants e2e \
      --contexts 8192 131072 --modes graph --steps 32 --out $OUT/decode_760m_$side 2>&1 | tail -3
    echo "=== $side train 125m 8K graph"
    PYTHONPATH=$src timeout 150 python3 -m tttlm.cli bench train --preset 125m --seq-len 8192 \
      --variants e2e --modes graph --repeats 5 --out $OUT/train_125m_8k_$side 2>&1 | tail -3
  fi
done
for f in $OUT/*.md; do echo "## $f"; grep "^|" "$f"; done
