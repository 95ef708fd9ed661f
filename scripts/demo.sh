#!/usr/bin/env bash
# The whole Clover-2 pipeline on the embedded default: SmolLM2-135M-Instruct as the teacher,
# chitchat conversations answered by the teacher itself as training data, MT-bench as held-out
# prompts. Sized to finish within 30 minutes after set-up on the slower of the 2-core CPUs seen
# (about half that on the faster ones); with CUDA it uses a larger budget.
# Progress reaches a log too: redirected, each long stage prints a line every 30 s.
# Every stage is resumable: rerunning continues where an interrupted run stopped. The stages
# whose outputs are rebuilt whole (prepare, export, eval, report) pass --overwrite: they replace
# only what this demo wrote before, never a directory clover did not write.
set -euo pipefail
cd "$(dirname "$0")/.."

CLOVER=${CARGO_TARGET_DIR:-target}/release/clover
TEACHER=checkpoints/smollm2-135m-instruct
WORK=data/work
HEAD_OUT=checkpoints/clover2-smollm2

DEVICE=$(scripts/doctor-device.sh "$CLOVER")
if [ "$DEVICE" = cuda ]; then
  CONVERSATIONS=4096; TURNS=2; NEW_TOKENS=256; PER_CATEGORY=10; EVAL_TOKENS=256; PROFILE=cuda
  # All 80 MT-bench questions are evaluated: calibrate on the prepared eval split instead.
  CALIBRATION=(--data "$WORK/prepared")
else
  CONVERSATIONS=256; TURNS=1; NEW_TOKENS=96; PER_CATEGORY=2; EVAL_TOKENS=40; PROFILE=cpu
  # 16 of the 64 MT-bench questions this run does not evaluate (the teacher answers them first).
  CALIBRATION=(--calib-prompts "$WORK/mt_bench_questions.jsonl" --calib-limit 16)
fi
echo "== clover demo on $DEVICE: $CONVERSATIONS conversations, $PER_CATEGORY MT-bench questions per category"

step() { echo; echo "== $*"; }

step "1/7 self-distillation: the teacher answers the chitchat prompts"
$CLOVER data regenerate --data $WORK/chitchat-sharegpt.json --model $TEACHER --out $WORK/regen \
  --limit $CONVERSATIONS --max-turns $TURNS --max-new-tokens $NEW_TOKENS --batch-size 32 --device $DEVICE

step "2/7 prepare: tokenize with the model's chat template and mask the assistant turns"
$CLOVER data prepare --input $WORK/regen/conversations.jsonl --model $TEACHER --template auto \
  --out $WORK/prepared --max-len 1024 --eval-fraction 0.05 --overwrite

step "3/7 distill: cache the teacher's pre-norm hidden states"
$CLOVER distill --data $WORK/prepared --model $TEACHER --out $WORK/distill --device $DEVICE

step "4/7 train the Clover-2 head"
# A run with checkpoints continues; one killed before its first checkpoint (logs only) starts
# over, which `clover train` refuses without --overwrite.
RESUME=""; [ -d $WORK/train ] && RESUME=--overwrite
[ -n "$(ls -A $WORK/train/checkpoints 2>/dev/null)" ] && RESUME=--resume
$CLOVER train --config configs/smollm2-135m.toml --profile $PROFILE $RESUME

step "5/7 export"
$CLOVER export --checkpoint $WORK/train/latest --out $HEAD_OUT --overwrite

step "6/7 evaluate: speculative vs plain decoding on MT-bench (auto tree, then the default tree)"
# auto calibrates the head and this device ($CALIBRATION above, never the evaluated questions),
# then searches the fastest tree (plain decoding included); the default mc_sim_7b_63 row is kept
# for comparison.
$CLOVER eval --model $TEACHER --draft $HEAD_OUT --prompts $WORK/mt_bench_questions.jsonl \
  --tree auto,default "${CALIBRATION[@]}" \
  --per-category $PER_CATEGORY --max-new-tokens $EVAL_TOKENS --device $DEVICE --report $WORK/eval.json --overwrite

step "7/7 report: table and plots of this run (data/work/report)"
$CLOVER report $WORK/eval.json --out $WORK/report --overwrite
