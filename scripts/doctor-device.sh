#!/usr/bin/env bash
# Prints the device the scripts budget for, "cuda" or "cpu", from `clover doctor --json`
# (CLOVER, the binary, is the first argument). It parses the JSON object rather than matching a
# line of the text report, and fails (so a `set -e` caller stops) when doctor fails or its
# object lacks a boolean cuda_available: a reworded or broken report never sends a GPU machine
# down the CPU budget unnoticed.
set -euo pipefail
"$1" doctor --json | python3 -c '
import json, sys
found = json.load(sys.stdin)
cuda = found.get("cuda_available")
if not isinstance(cuda, bool):
    sys.exit(f"clover doctor --json: cuda_available is {cuda!r}, not true or false")
print("cuda" if cuda else "cpu")
'
