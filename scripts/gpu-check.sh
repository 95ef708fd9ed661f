#!/usr/bin/env bash
# The one prepared GPU run: everything clover wants to know about a CUDA machine, in one go.
#
#   scripts/gpu-check.sh --out FILE.json [--bundle DIR] [--torch-lib DIR] [--gguf FILE | --teacher DIR]
#   scripts/gpu-check.sh --cpu-smoke --out FILE.json      # the same parts, tiny, on this CPU
#
# It needs no Rust toolchain and no network: `make gpu-bundle` builds here what it runs (the
# `clover` binary, the integration-test binary, MT-bench and a slice of the chitchat data) into
# target/gpu-bundle/, and the teacher comes as SmolLM2's GGUF (imported on the spot) or a model dir.
# Parts, each under its own time limit, in this order:
#   env            nvidia-smi and `clover doctor`
#   tests          the integration suite with CLOVER_TEST_DEVICE=cuda (the device tests on CUDA)
#   bench-*        teacher prefill/decode tokens/s: SmolLM2 and a Vicuna-7B-shape random teacher (bf16)
#   train-*        `bench-train`: offline at Vicuna-7B 4 x 2048 and LLaMA3-8B 2 x 2048, online at
#                  Vicuna-7B 4 x 2048 (the issue's anchor shapes)
#   demo           regenerate, prepare, distill, train, export, eval on MT-bench, shortened
#   train-dp-1rank `clover train` as a one-rank data-parallel launch (NCCL on CUDA, Gloo here)
# FILE.json is rewritten after every part, so a timeout keeps what finished; a summary table is
# printed at the end. The full run is sized for about 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

OUT="" SMOKE=0 BUNDLE=${CARGO_TARGET_DIR:-target}/gpu-bundle TORCH_LIB="" GGUF="" TEACHER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    --torch-lib) TORCH_LIB=$2; shift 2 ;;
    --gguf) GGUF=$2; shift 2 ;;
    --teacher) TEACHER=$2; shift 2 ;;
    *) echo "gpu-check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu-check: --out FILE.json is required" >&2; exit 2; }
if [ -n "$TORCH_LIB" ]; then export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"; fi

CLOVER=$BUNDLE/clover
TESTS=$BUNDLE/clover-tests
for f in "$CLOVER" "$TESTS"; do
  [ -x "$f" ] || { echo "gpu-check: $f missing: run \`make gpu-bundle\` where cargo is" >&2; exit 2; }
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/clover-gpu-check.XXXXXX")
mkdir -p "$(dirname "$OUT")"
PARTS=$WORK/parts.jsonl
: > "$PARTS"

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; DTYPE=f32
else
  DEVICE=cuda; DTYPE=bf16
fi

# Rewrites FILE.json from the parts so far (python3 is on both machines; jq may not be).
write_json() {
  python3 - "$PARTS" "$OUT" "$SMOKE" <<'PY'
import json, sys
parts = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
report = {"mode": "cpu-smoke" if sys.argv[3] == "1" else "gpu", "parts": parts}
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
}

# part NAME SECONDS CMD...: runs CMD under a time limit, keeps its exit code, seconds, the JSON
# lines it printed (bench reports) and the tail of its output.
part() {
  local name=$1 limit=$2; shift 2
  local log=$WORK/$name.log start end rc
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  tail -n 3 "$log"
  python3 - "$name" "$rc" "$start" "$end" "$log" "$*" >> "$PARTS" <<'PY'
import json, sys
name, rc, start, end, log, cmd = sys.argv[1:7]
text = open(log, errors="replace").read()
lines = []
for line in text.splitlines():
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
summary = [l for l in text.splitlines() if l.startswith("test result:")]
print(json.dumps({
    "part": name, "rc": int(rc), "timed_out": int(rc) in (124, 137),
    "seconds": round(float(end) - float(start), 1), "command": cmd,
    "json": lines, "test_result": summary, "tail": text[-3000:],
}))
PY
  write_json
}

# A JSON report file written by a part, folded into its record.
attach() {
  local name=$1 file=$2
  [ -f "$file" ] || return 0
  python3 - "$PARTS" "$name" "$file" <<'PY'
import json, sys
path, name, file = sys.argv[1:4]
parts = [json.loads(l) for l in open(path) if l.strip()]
for p in parts:
    if p["part"] == name:
        p["json"].append(json.load(open(file)))
with open(path, "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in parts)
PY
  write_json
}

part env 60 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; $CLOVER doctor"

# The teacher: a model dir, or SmolLM2's GGUF imported here, or the one `make setup` imported.
if [ -z "$TEACHER" ]; then
  if [ -n "$GGUF" ]; then
    TEACHER=$WORK/smollm2
    part import 120 "$CLOVER" import-gguf "$GGUF" --out "$TEACHER"
  else
    TEACHER=checkpoints/smollm2-135m-instruct
  fi
fi
QUESTIONS=$BUNDLE/mt_bench_questions.jsonl
[ -f "$QUESTIONS" ] || QUESTIONS=data/work/mt_bench_questions.jsonl
CHITCHAT=$BUNDLE/chitchat-sharegpt.json
[ -f "$CHITCHAT" ] || CHITCHAT=data/work/chitchat-sharegpt.json

export CLOVER_REPO_ROOT=$REPO CLOVER_BIN=$CLOVER CLOVER_SMOLLM2_DIR=$TEACHER
if [ -n "$GGUF" ]; then export CLOVER_SMOLLM2_GGUF=$GGUF; fi
if [ "$SMOKE" = 1 ]; then
  part tests 600 env CLOVER_TEST_DEVICE=cpu OMP_NUM_THREADS=1 "$TESTS" device::
  part bench-smollm2 120 "$CLOVER" bench --model "$TEACHER" --device cpu --prefill-tokens 32 \
    --decode-tokens 4 --out "$WORK/bench-smollm2.json"
  attach bench-smollm2 "$WORK/bench-smollm2.json"
  part bench-vicuna-7b 120 "$CLOVER" bench --like vicuna-7b --layers 1 --device cpu \
    --prefill-tokens 16 --decode-tokens 2 --out "$WORK/bench-vicuna.json"
  attach bench-vicuna-7b "$WORK/bench-vicuna.json"
  part train-vicuna-7b-offline 300 "$CLOVER" bench-train --like smollm2-135m --layers 1 \
    --device cpu --mode offline --batch 1 --seq-len 64 --steps 1
  part train-llama3-8b-offline 300 "$CLOVER" bench-train --like smollm2-135m --layers 1 \
    --device cpu --mode offline --batch 1 --seq-len 32 --steps 1 --loss-chunk 0
  part train-vicuna-7b-online 300 "$CLOVER" bench-train --like smollm2-135m --layers 1 \
    --device cpu --mode online --batch 1 --seq-len 64 --steps 1
  CONVERSATIONS=6; NEW_TOKENS=12; STEPS=3; STEP_TOKENS=256; PER_CATEGORY=1; EVAL_TOKENS=8; LIMIT=1
else
  # The checks of the packaged data sets (the_packaged_*) need data/downloads, which no bundle
  # carries (the ShareGPT file alone is 125 MB); they run with `make test`.
  part tests 200 env CLOVER_TEST_DEVICE=cuda "$TESTS" --test-threads 4 --skip the_packaged_
  part bench-smollm2 60 "$CLOVER" bench --model "$TEACHER" --device cuda --dtype bf16 \
    --out "$WORK/bench-smollm2.json"
  attach bench-smollm2 "$WORK/bench-smollm2.json"
  part bench-vicuna-7b 90 "$CLOVER" bench --like vicuna-7b --device cuda --dtype bf16 \
    --out "$WORK/bench-vicuna.json"
  attach bench-vicuna-7b "$WORK/bench-vicuna.json"
  # Offline steps never run the teacher's layers: one layer keeps start-up short.
  part train-vicuna-7b-offline 90 "$CLOVER" bench-train --like vicuna-7b --layers 1 \
    --device cuda --dtype bf16 --mode offline --batch 4 --seq-len 2048 --steps 10
  part train-llama3-8b-offline 90 "$CLOVER" bench-train --like llama3-8b-instruct --layers 1 \
    --device cuda --dtype bf16 --mode offline --batch 2 --seq-len 2048 --steps 10
  part train-vicuna-7b-online 90 "$CLOVER" bench-train --like vicuna-7b \
    --device cuda --dtype bf16 --mode online --batch 4 --seq-len 2048 --steps 5
  CONVERSATIONS=512; NEW_TOKENS=96; STEPS=300; STEP_TOKENS=8192; PER_CATEGORY=2; EVAL_TOKENS=128; LIMIT=16
fi

# The shortened demo, in its own directory (never data/work).
DEMO=$WORK/demo
mkdir -p "$DEMO"
cat > "$DEMO/train.toml" <<EOF
model_dir = "$TEACHER"
data_dir = "$DEMO/prepared"
distill_cache = "$DEMO/distill"
out_dir = "$DEMO/train"
device = "$DEVICE"
max_steps = $STEPS
batch_tokens = $STEP_TOKENS
max_len = 1024
warmup_steps = 1
eval_every = $STEPS
save_every = $STEPS
eval_samples = 16
EOF
part demo 300 bash -c "set -e
  '$CLOVER' data regenerate --data '$CHITCHAT' --model '$TEACHER' --out '$DEMO/regen' --limit $CONVERSATIONS \
    --max-turns 1 --max-new-tokens $NEW_TOKENS --batch-size 64 --device $DEVICE
  '$CLOVER' data prepare --input '$DEMO/regen/conversations.jsonl' --model '$TEACHER' --template auto \
    --out '$DEMO/prepared' --max-len 1024 --eval-fraction 0.1
  '$CLOVER' distill --data '$DEMO/prepared' --model '$TEACHER' --out '$DEMO/distill' --device $DEVICE
  '$CLOVER' train --config '$DEMO/train.toml'
  '$CLOVER' export --checkpoint '$DEMO/train/latest' --out '$DEMO/head'
  '$CLOVER' eval --model '$TEACHER' --draft '$DEMO/head' --prompts '$QUESTIONS' --per-category $PER_CATEGORY \
    --limit $LIMIT --max-new-tokens $EVAL_TOKENS --device $DEVICE --report '$DEMO/eval.json'"
attach demo "$DEMO/eval.json"

# The data-parallel path with one rank (NCCL on CUDA, Gloo in the CPU smoke): world size 1 runs
# the rendezvous, rank 0's broadcast, the bucketed gradient all-reduce and the replica check.
sed -e "s#^out_dir = .*#out_dir = \"$DEMO/train-dp\"#" -e "s#^max_steps = .*#max_steps = 10#" \
  -e "s#^eval_every = .*#eval_every = 10#" -e "s#^save_every = .*#save_every = 10#" \
  "$DEMO/train.toml" > "$DEMO/train-dp.toml"
part train-dp-1rank 120 env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 \
  MASTER_PORT=29517 "$CLOVER" train --config "$DEMO/train-dp.toml"

# The summary table.
python3 - "$OUT" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"\n{'part':26} {'rc':>4} {'s':>7}  figures")
for p in report["parts"]:
    figs = []
    for j in p["json"]:
        if "tokens_per_s" in j and "mode" in j:
            peak = j.get("peak_bytes")
            figs.append(f"{j['mode']} {j['tokens_per_s']:.0f} tok/s, {j['ms_per_step']:.1f} ms/step, peak "
                        + (f"{peak / 2**30:.2f} GiB" if peak else "n/a"))
        elif "tau" in j:
            figs.append(f"tau {j['tau']:.3f}, {j.get('tokens_per_s', 0):.1f} tok/s, speedup {j.get('speedup', 0):.2f}x, "
                        f"mismatches {j.get('lossless_mismatches')}")
        elif "prefill_tokens_per_s" in json.dumps(j):
            figs.append(json.dumps(j)[:160])
    figs += p["test_result"]
    print(f"{p['part']:26} {p['rc']:>4} {p['seconds']:>7.1f}  {'; '.join(figs)[:200]}")
print(f"\nwritten: {sys.argv[1]}")
PY
FAILED=$(python3 -c "import json,sys; print(sum(p['rc'] != 0 for p in json.load(open(sys.argv[1]))['parts']))" "$OUT")
rm -rf "$WORK"
[ "$FAILED" = 0 ]
