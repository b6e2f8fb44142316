# Before/after timings on one GPU, one run: BEFORE_SRC (e.g. `git archive REV src | tar -x -C .before`,
# then .before/src) against this tree's src. Usage: ROOT=$PWD BEFORE_SRC=.before/src OUT=dir bash THIS
set -u
export PYTHONUNBUFFERED=1
cd /tmp
for side in before after; do
  if [ $side = before ]; then src=$ROOT/$BEFORE_SRC; paths=""; else src=$ROOT/src; paths="--paths model engine"; fi
  echo "=== $side prefill 3b 8K compiled"
  PYTHONPATH=$src timeout 200 python3 -m tttlm.cli bench prefill --preset 3b --variants e2e --lengths 8192 --compile compiled --repeats 3 $paths --out $OUT/prefill_3b_8k_$side 2>&1 | grep -v "^{" | tail -3
  echo "=== $side decode 760m 8K graph"
  PYTHONPATH=$src timeout 90 python3 -m tttlm.cli bench decode --presets 760m --variants e2e --contexts 8192 --modes graph --steps 32 --out $OUT/decode_760m_$side 2>&1 | tail -2
done
cat $OUT/*.md
