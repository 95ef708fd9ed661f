"""Greedy continuations of the imported SmolLM2 teacher with HF transformers' LlamaForCausalLM.

Run once after `make setup` (needs torch + transformers):
    .venv/bin/python scripts/golden_smollm2.py
Writes tests/fixtures/smollm2_greedy.json: for each chat prompt, the prompt ids (rendered with the
model's own chat template) and 64 greedy new token ids in f32 on CPU. The Rust test compares
`clover::generate` against it without Python.
"""
import json
import os
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODEL = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")
PROMPTS = [
    "What is the capital of France?",
    "Write a long story about a dragon who learns to paint.",
    "Explain how a hash map works, with a short Python example.",
]

tok = AutoTokenizer.from_pretrained(MODEL)
model = LlamaForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
cases = []
for prompt in PROMPTS:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    cases.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "new_ids": new, "text": tok.decode(new)})
    print(prompt, "->", repr(tok.decode(new)))
with open(os.path.join(ROOT, "tests", "fixtures", "smollm2_greedy.json"), "w") as f:
    json.dump(cases, f, indent=1)
