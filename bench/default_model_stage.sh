#!/usr/bin/env bash
# One self-distillation stage of the default model on the lent GPU (MODEL_CARD.md, stages F to I): the
# corpus, INIT's own diffusion answers to the training files' signatures (a time budget), then training
# from INIT on the corpus mixed with them. Copies the new weights, generation config and logs to OUT.
# Usage: bash bench/default_model_stage.sh WORKDIR INIT_MODEL OUT TEACHER_SECONDS TEACHER_STEPS MINUTES \
#     [TEACHER_ARGS...]   (more arguments of scripts/build_completion_data.py, e.g. --also-without-newline)
set -euo pipefail
work=$1; init=$2; out=$3; teacher_s=$4; teacher_steps=$5; minutes=$6; shift 6
mkdir -p "$work" "$out"
began=$(date +%s)
python3 scripts/build_corpus.py "$work/corpus" --max-files 10000 > "$work/corpus.log"
echo "corpus: $(( $(date +%s) - began )) s"
# the teacher stops at its time budget; every batch it finished is kept
timeout "$teacher_s" python3 scripts/build_completion_data.py "$init" "$work/corpus" "$work/completions.jsonl" \
    --teacher diffusion --batch-size 256 --max-prompts 16000 --max-steps "$teacher_steps" "$@" \
    2> "$work/teacher.log" || true
tail -1 "$work/teacher.log" | tee "$out/teacher_tail.txt"
# a batch cut off by the budget may have left a partial last line
python3 -c "import json,sys; p=sys.argv[1]; ok=[l for l in open(p) if l.endswith(chr(10))]; open(p,'w').writelines(ok)" \
    "$work/completions.jsonl"
echo "records: $(wc -l < "$work/completions.jsonl")"
bash bench/default_model_v2.sh "$work" "$init" "$minutes" 0.8 --supervise-padding --lr 5e-4 > "$out/train.log" 2>&1
tail -5 "$out/train.log"
cp "$work"/run/model/model-0000*.safetensors "$work/run/model/model.safetensors.index.json" \
    "$work/run/model/generation_config.json" "$out/"
md5sum "$work"/run/model/*.json "$work"/run/model/*.jinja "$init"/*.json "$init"/*.jinja
echo "total: $(( $(date +%s) - began )) s"
