#!/bin/bash
# One device call that re-measures what docs/benchmarks.md's tables quote (about 8 minutes on a freshly
# started H100): the bf16 bench with every section, the fast path's agreement with the pure-torch path,
# then the FP8 bench's step sections. Each part has its own time limit, so one that hangs cannot take
# the others' results with it. Writes JSON, logs and the plot under $OUT.
#
#     bash bench/device_full.sh
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:?set OUT to the folder for the results}
DG="python3 -c 'from dgemma.cli import main; main()'"
QUIET="-e fused_glue -e nvjet -e sbtopk -e Warning -e _warn_once"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 300 bash -c "$DG bench --sections first_canvas,correctness,profile,profile8,single,canvases,memory,streams \
  --streams 1,4,8,32 --reps 5 --json $OUT/bf16.json --plot $OUT/bf16.png" > "$OUT/bf16.log" 2>&1
echo "bf16 bench: rc $?"; grep -v $QUIET "$OUT/bf16.log" | tail -40
timeout 100 python3 bench/fast_path_agreement.py --json "$OUT/agreement.json" > "$OUT/agreement.log" 2>&1
echo "agreement: rc $?"; tail -4 "$OUT/agreement.log"
timeout 170 bash -c "$DG bench --quantization fp8 --sections profile,single,canvases,streams --streams 1,8 \
  --reps 5 --json $OUT/fp8.json" > "$OUT/fp8.log" 2>&1
echo "fp8 bench: rc $?"; grep -v $QUIET "$OUT/fp8.log" | tail -30
