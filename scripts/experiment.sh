#!/usr/bin/env bash
# Distillation experiment on the demo's data: an EAGLE-1 and a Medusa head trained on the demo's
# distillation cache with the same config and step budget as the demo's Clover-2 head (only
# `head`, and Medusa's decay 0.8, change), all three evaluated on the same MT-bench questions and
# tree, then `clover report` (table + plots). Run `make demo` first. About 35 minutes on a 2-core
# CPU after the demo; larger budgets on CUDA (the config's [cuda] table).
#
# Knobs (environment):
#   EXPERIMENT_STEPS=N       train every head for N steps instead of the config's budget; then the
#                            Clover-2 head is retrained too (same N), so the comparison stays fair
#   EXPERIMENT_OUT=DIR       where runs, heads, eval reports and the report go (data/work/experiment)
#   EXPERIMENT_WORK=DIR      the demo's work dir to read: prepared, distill, train (data/work)
#   EXPERIMENT_PER_CATEGORY, EXPERIMENT_EVAL_TOKENS   the eval size (default: the demo's)
#   EXPERIMENT_LIMIT=N       evaluate only the first N of those questions (a smoke run)
# Every stage is resumable: rerunning continues interrupted training.
set -euo pipefail
cd "$(dirname "$0")/.."

CLOVER=${CARGO_TARGET_DIR:-target}/release/clover
TEACHER=checkpoints/smollm2-135m-instruct
CONFIG=configs/smollm2-135m.toml
WORK=${EXPERIMENT_WORK:-data/work}
OUT=${EXPERIMENT_OUT:-data/work/experiment}
STEPS=${EXPERIMENT_STEPS:-}

DEVICE=$(scripts/doctor-device.sh "$CLOVER")
if [ "$DEVICE" = cuda ]; then
  PER_CATEGORY=10; EVAL_TOKENS=256; PROFILE=cuda
else
  PER_CATEGORY=2; EVAL_TOKENS=40; PROFILE=cpu
fi
PER_CATEGORY=${EXPERIMENT_PER_CATEGORY:-$PER_CATEGORY}
EVAL_TOKENS=${EXPERIMENT_EVAL_TOKENS:-$EVAL_TOKENS}
LIMIT=()
[ -n "${EXPERIMENT_LIMIT:-}" ] && LIMIT=(--limit "$EXPERIMENT_LIMIT")

for need in "$WORK/distill/distill.json" "$WORK/prepared" "$WORK/mt_bench_questions.jsonl"; do
  [ -e "$need" ] || { echo "missing $need: run \`make demo\` first" >&2; exit 1; }
done
mkdir -p "$OUT"
step() { echo; echo "== $*"; }

# Heads to train here: the two baselines, and Clover-2 too when the step budget is not the demo's.
HEADS="eagle1 medusa"
[ -n "$STEPS" ] && HEADS="clover2 $HEADS"
echo "== clover experiment on $DEVICE: heads $HEADS${STEPS:+, $STEPS steps each}"

for HEAD in $HEADS; do
  RUN=$OUT/train-$HEAD
  SETS=(--set "head=\"$HEAD\"" --set "out_dir=$RUN" --set "data_dir=$WORK/prepared"
        --set "distill_cache=$WORK/distill")
  [ "$HEAD" = medusa ] && SETS+=(--set decay=0.8)
  [ -n "$STEPS" ] && SETS+=(--set "max_steps=$STEPS" --set "eval_every=$STEPS" --set "save_every=$STEPS"
                            --set "warmup_steps=$(( STEPS / 10 ))")
  # With checkpoints it continues; killed before its first one (logs only), it starts over.
  RESUME=""; [ -d "$RUN" ] && RESUME=--overwrite
  [ -n "$(ls -A "$RUN/checkpoints" 2>/dev/null)" ] && RESUME=--resume
  step "train $HEAD"
  $CLOVER train --config $CONFIG --profile $PROFILE "${SETS[@]}" $RESUME
done

step "export and evaluate every head on the same questions and tree"
for HEAD in clover2 eagle1 medusa; do
  RUN=$OUT/train-$HEAD
  # Without EXPERIMENT_STEPS the Clover-2 run is the demo's own.
  [ "$HEAD" = clover2 ] && [ -z "$STEPS" ] && RUN=$WORK/train
  $CLOVER export --checkpoint "$RUN/latest" --out "$OUT/head-$HEAD" --overwrite
  $CLOVER eval --model $TEACHER --draft "$OUT/head-$HEAD" --prompts $WORK/mt_bench_questions.jsonl \
    --per-category $PER_CATEGORY --max-new-tokens $EVAL_TOKENS --device $DEVICE "${LIMIT[@]}" --report "$OUT/$HEAD.json" --overwrite
done

step "report"
$CLOVER report "$OUT/clover2.json" "$OUT/eagle1.json" "$OUT/medusa.json" --out "$OUT/report" --overwrite
