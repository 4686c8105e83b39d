#!/bin/bash
# one device call: the FP8 bench (sweep, correctness, speed, streams), then bf16 speed and streams again
cd "$(dirname "$0")/.."
DG="python3 -c 'from dgemma.cli import main; main()'"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
eval $DG bench --quantization fp8 --sections first_canvas,moe,correctness,profile,profile8,single,canvases,memory,streams \
  --streams 1,4,8,32 --reps 5 --json $OUT/fp8.json --plot $OUT/fp8.png 2>&1 | grep -v "^\s*$" | tail -70
eval $DG bench --sections single,canvases,streams --streams 1,4,8,32 --reps 5 --json $OUT/bf16.json 2>&1 | tail -30
