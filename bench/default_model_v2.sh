#!/usr/bin/env bash
# One distillation stage of the default model (see dgemma/default_model/MODEL_CARD.md) on the lent GPU:
# the corpus, the INIT model's own greedy answers as training data (unless WORKDIR/completions.jsonl
# exists already), then training from INIT on the corpus mixed with those answers. Arguments after the
# first four go to scripts/train_default_model.py (e.g. --supervise-padding).
# Usage: bash bench/default_model_v2.sh WORKDIR INIT_MODEL MINUTES COMPLETION_SHARE [TRAIN_ARGS...]
set -euo pipefail
work=$1; init=$2; minutes=$3; share=$4; shift 4
mkdir -p "$work"
[ -f "$work/corpus/manifest.json" ] || python3 scripts/build_corpus.py "$work/corpus" --max-files 10000
[ -f "$work/completions.jsonl" ] || python3 scripts/build_completion_data.py "$init" "$work/corpus" \
    "$work/completions.jsonl" --batch-size 1024 > "$work/completions_summary.json"
python3 scripts/train_default_model.py --corpus "$work/corpus" --out "$work/run" --minutes "$minutes" \
    --batch-size 128 --lr 1e-3 --canvases-per-example 4 --init-from "$init" \
    --completions "$work/completions.jsonl" --completion-share "$share" "$@"
