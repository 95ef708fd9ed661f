"""Loads a `clover export --format speculators` EAGLE-3 head with vLLM speculators' own loader
(speculators 0.9.0, `SpeculatorModel.from_pretrained`, CPU, eager attention) and runs its own
training-time-test forward on the teacher states clover used; exits non-zero unless the load has
no missing, unexpected or mis-shaped key and its draft tokens of every step equal clover's.

Driven by tests/clients.rs: python speculators_check.py EXPORT_DIR CASE_DIR, where CASE_DIR holds
case.safetensors (hidden_states [1,T,3H] f32, input_ids [1,T] i64) and case.json (ttt_steps,
clover's draft tokens per step, draft-space indices, step j's rows t < T-j).

A token differs only where the two logits it is chosen by lie within a rounding tie: the check
reads speculators' logits of both tokens and allows a gap of at most 1e-4 (f32 over a 1,728-wide
fc and one layer puts the two implementations' logits a few 1e-6 apart)."""

import json
import sys

import torch
from safetensors.torch import load_file
from speculators import SpeculatorModel, SpeculatorModelConfig

TIE = 1e-4


def load(export_dir):
    """The head by speculators' own loader; then its key set against the file's: every tensor
    of the file lands in the model with its shape and values, and every model tensor the file
    lacks is one the loader itself declares optional (`_keys_to_ignore_on_load_missing`)."""
    config = SpeculatorModelConfig.from_pretrained(export_dir)
    config.transformer_layer_config._attn_implementation = "eager"
    model = SpeculatorModel.from_pretrained(export_dir, config=config).eval()
    stored = load_file(f"{export_dir}/model.safetensors")
    state = model.state_dict()
    optional = set(type(model)._keys_to_ignore_on_load_missing)
    unexpected = sorted(set(stored) - set(state))
    missing = sorted(set(state) - set(stored) - optional)
    if unexpected or missing:
        sys.exit(f"speculators: unexpected keys {unexpected}, missing keys {missing}")
    for name, t in stored.items():
        have = state[name]
        if have.shape != t.shape or not torch.equal(have.to(t.dtype), t):
            sys.exit(f"speculators: {name} loaded as {tuple(have.shape)}, stored {tuple(t.shape)}")
    print(f"speculators: {len(stored)} tensors loaded, none missing or unexpected")
    return model


def main(export_dir, case_dir):
    model = load(export_dir)
    if model.config.eagle_aux_hidden_state_layer_ids != [2, 15, 27]:
        sys.exit(f"speculators: layers {model.config.eagle_aux_hidden_state_layer_ids}")
    tensors = load_file(f"{case_dir}/case.safetensors")
    with open(f"{case_dir}/case.json") as f:
        case = json.load(f)
    steps = case["ttt_steps"]
    logits = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    hidden, ids = tensors["hidden_states"], tensors["input_ids"]
    with torch.no_grad():
        drafted = model(
            hidden_states=hidden,
            input_ids=ids,
            document_ids=torch.zeros_like(ids),
            ttt_steps=steps,
        )
    t = ids.shape[1]
    compared, ties = 0, 0
    for j in range(steps):
        theirs = drafted[j][0, : t - j].tolist()
        ours = case["draft_tokens"][j]
        if len(ours) != len(theirs):
            sys.exit(f"step {j}: clover has {len(ours)} rows, speculators {len(theirs)}")
        for row, (a, b) in enumerate(zip(ours, theirs)):
            compared += 1
            if a == b:
                continue
            gap = (logits[j][0, row, b] - logits[j][0, row, a]).item()
            if gap > TIE:
                sys.exit(f"step {j} row {row}: clover drafts {a}, speculators {b} (gap {gap})")
            ties += 1
    print(f"speculators: {compared} draft tokens over {steps} steps equal clover's ({ties} ties)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
