"""Golden ids and loss masks for train/chat.rs, from HF transformers' apply_chat_template.

Usage: python scripts/golden_templates.py <hf model dir with tokenizer.json> [out dir]
  The committed goldens come from checkpoints/smollm2-135m-instruct (SmolLM2-135M-Instruct imported
  from the embedded GGUF; its tokenizer.json has SmolLM2's Digits + ByteLevel pre-tokenizer).

Writes (default out dir tests/fixtures/chat):
  tokenizer/   a pruned copy of the SmolLM2 tokenizer (only the BPE merges the golden texts use,
               plus the byte alphabet and added tokens) with tokenizer_config.json + chat_template;
               checked here to give the same ids as the full tokenizer on every golden text.
  golden.json  per template: messages, rendered text, input_ids, loss_mask, prompt_ids.

The texts come from the references, not from the Jinja copies in chat.rs:
  vicuna  FastChat's own Conversation (get_conv_template("vicuna_v1.1")) + the "<s>" BOS;
  llama3  Meta-Llama-3-8B-Instruct's official chat_template (bos <|begin_of_text|>);
  chatml  the ChatML template of the HF docs;  auto  SmolLM2's own chat_template.
The masks come from HF's return_assistant_tokens_mask, using a copy of each template with a
{% generation %} block around the assistant content and its end-of-turn marker; the script asserts
that copy renders the same text as the unmarked template.
We have no Llama/Vicuna tokenizer offline, so every text is tokenized with the SmolLM2 tokenizer.
"""
import json
import os
import sys

from transformers import AutoTokenizer
from tokenizers import Tokenizer

FASTCHAT = "/tmp/pkgs/mtb/mtbench_evaluator/fastchat"

LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
LLAMA3_MARKED = "{% for message in messages %}{% set head = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' %}{% if loop.index0 == 0 %}{% set head = bos_token + head %}{% endif %}{{ head }}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
CHATML_MARKED = "{% for message in messages %}{% if loop.first and SYSTEM_DEFAULT and messages[0]['role'] != 'system' %}{{ SYSTEM_DEFAULT }}{% endif %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

VICUNA_MARKED = "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}{% else %}{% set system = DEFAULT_SYSTEM %}{% set loop_messages = messages %}{% endif %}{{ bos_token + system + ' ' }}{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}{% else %}{{ 'ASSISTANT: ' }}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"

TWO_TURNS = [
    {"role": "user", "content": "Hi! What's 2+2?"},
    {"role": "assistant", "content": "2 + 2 = 4.\nAnything else?"},
    {"role": "user", "content": "Say \"café\" twice, please."},
    {"role": "assistant", "content": " café café "},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}] + TWO_TURNS


def fastchat_vicuna(messages):
    sys.path.insert(0, FASTCHAT)
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    body = messages
    if messages[0]["role"] == "system":
        conv.set_system_message(messages[0]["content"])
        body = messages[1:]
    for m in body:
        conv.append_message(conv.roles[0 if m["role"] == "user" else 1], m["content"])
    text = "<s>" + conv.get_prompt()
    return text, conv.system_message


def fastchat_vicuna_prompt(messages):
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    body = messages
    if messages[0]["role"] == "system":
        conv.set_system_message(messages[0]["content"])
        body = messages[1:]
    for m in body:
        conv.append_message(conv.roles[0 if m["role"] == "user" else 1], m["content"])
    conv.append_message(conv.roles[1], None)
    return "<s>" + conv.get_prompt()


def hf_render(tok, template, messages, gen, **kw):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=gen, **kw)


def hf_ids_mask(tok, marked, messages, **kw):
    out = tok.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, add_generation_prompt=False, **kw)
    return list(out["input_ids"]), list(out["assistant_masks"])


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def golden_case(tok, name, messages):
    if name == "vicuna":
        text, default_system = fastchat_vicuna(messages)
        kw = {"bos_token": "<s>", "DEFAULT_SYSTEM": default_system}
        marked = VICUNA_MARKED
        prompt = fastchat_vicuna_prompt(messages)
    elif name == "llama3":
        kw = {"bos_token": "<|begin_of_text|>"}
        text = hf_render(tok, LLAMA3, messages, False, **kw)
        prompt = hf_render(tok, LLAMA3, messages, True, **kw)
        marked = LLAMA3_MARKED
    elif name == "chatml":
        kw = {"SYSTEM_DEFAULT": ""}
        text = hf_render(tok, CHATML, messages, False)
        prompt = hf_render(tok, CHATML, messages, True)
        marked = CHATML_MARKED
    else:  # auto: the model's own template
        kw = {"SYSTEM_DEFAULT": SMOL_SYSTEM}
        text = hf_render(tok, None, messages, False)
        prompt = hf_render(tok, None, messages, True)
        marked = CHATML_MARKED
    marked_text = hf_render(tok, marked, messages, False, **kw)
    assert marked_text == text, (name, marked_text, text)
    ids, mask = hf_ids_mask(tok, marked, messages, **kw)
    assert ids == encode(tok, text), name
    return {"template": name, "messages": messages, "text": text, "input_ids": ids,
            "loss_mask": mask, "prompt_text": prompt, "prompt_ids": encode(tok, prompt)}


def pruned_tokenizer(full_json, texts, full):
    """Keep only the merges the texts need; BPE then gives the same ids on those texts."""
    model = full_json["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    need = set()
    for text in texts:
        need.update(full.encode(text, add_special_tokens=False).tokens)
    by_result = {}
    for a, b in merges:
        by_result.setdefault(a + b, []).append((a, b))
    stack = list(need)
    while stack:
        for a, b in by_result.get(stack.pop(), []):
            for part in (a, b):
                if part not in need:
                    need.add(part)
                    stack.append(part)
    alphabet = [t for t in model["vocab"] if len(t) == 1]
    keep = need | set(alphabet) | {t["content"] for t in full_json["added_tokens"]}
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t in keep}
    model["merges"] = [[a, b] for a, b in merges if a + b in need and a in keep and b in keep]
    return full_json


def main():
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/chat"
    tok = AutoTokenizer.from_pretrained(src)
    cases = []
    for name in ["vicuna", "llama3", "chatml", "auto"]:
        for messages in [TWO_TURNS, WITH_SYSTEM]:
            cases.append(golden_case(tok, name, messages))

    full = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    texts = [c["text"] for c in cases] + [c["prompt_text"] for c in cases]
    pruned = pruned_tokenizer(json.load(open(os.path.join(src, "tokenizer.json"))), texts, full)
    os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
    tok_path = os.path.join(out, "tokenizer", "tokenizer.json")
    with open(tok_path, "w") as f:
        json.dump(pruned, f, ensure_ascii=False, separators=(",", ":"))
    small = Tokenizer.from_file(tok_path)
    for text in texts:
        assert small.encode(text, add_special_tokens=False).ids == full.encode(text, add_special_tokens=False).ids
    config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
              "unk_token": tok.unk_token, "chat_template": tok.chat_template}
    with open(os.path.join(out, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=None)
    print(f"wrote {len(cases)} cases, pruned vocab {len(pruned['model']['vocab'])}")


if __name__ == "__main__":
    main()
