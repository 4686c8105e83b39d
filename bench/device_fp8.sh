#!/bin/bash
# one device call: the FP8 bench with its tuned tiles, then the embedded model's agreement with FP8 experts
cd "$(dirname "$0")/.."
DG="python3 -c 'from dgemma.cli import main; main()'"
eval $DG bench --quantization fp8 --sections first_canvas,moe,correctness,profile,profile8,single,canvases,memory,streams \
  --streams 1,4,8,32 --reps 5 --json $OUT/fp8.json --plot $OUT/fp8.png 2>&1 | grep -v "^\s*$" | grep -v "fused_glue\|profile8* nvjet\|sbtopk" | tail -60
python3 bench/fast_path_agreement.py --quantization fp8 --json $OUT/agreement_fp8.json 2>&1 | tail -4
