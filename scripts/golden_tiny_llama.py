"""Write tiny random-weight LLaMA fixtures and HF transformers' outputs on them.

Run once (needs torch + transformers): .venv/bin/python scripts/golden_tiny_llama.py
Writes tests/fixtures/tiny-llama-{tied,untied}/ with model.safetensors, config.json and
golden.safetensors (input_ids, logits, prenorm = last hidden state before the final norm).
The Rust tests compare against these without needing Python.
"""
import os
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def make(name, tie, rope_scaling=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0 if rope_scaling is None else 500000.0, rope_scaling=rope_scaling,
        max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init so that layers matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    out_dir = os.path.join(ROOT, name)
    model.save_pretrained(out_dir, safe_serialization=True)
    ids = torch.tensor([[1, 5, 17, 33, 2, 64, 70, 11, 95, 3, 42, 8]])
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: captured.update(prenorm=i[0]))
    with torch.no_grad():
        logits = model(ids).logits
    hook.remove()
    save_file({"input_ids": ids, "logits": logits.contiguous(), "prenorm": captured["prenorm"].contiguous()},
              os.path.join(out_dir, "golden.safetensors"))
    for junk in ("generation_config.json",):
        p = os.path.join(out_dir, junk)
        if os.path.exists(p):
            os.remove(p)


make("tiny-llama-tied", tie=True)
make("tiny-llama-untied", tie=False, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
print("ok")
