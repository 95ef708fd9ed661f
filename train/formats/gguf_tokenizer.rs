//! A GGUF file's BPE vocabulary and merges as HF `tokenizer.json` / `tokenizer_config.json`.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use serde_json::{json, Map, Value as Json};

use crate::formats::gguf::{GgufFile, Value};

/// llama.cpp token types (`llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

pub(crate) struct TokenizerMeta {
    pub(crate) tokens: Vec<String>,
    pub(crate) token_types: Vec<i64>,
    pub(crate) merges: Vec<String>,
    pub(crate) pre: String,
}

impl TokenizerMeta {
    pub(crate) fn read(f: &GgufFile) -> Result<Self> {
        let model = f
            .get_str("tokenizer.ggml.model")?
            .ok_or_else(|| anyhow!("metadata tokenizer.ggml.model is missing"))?;
        ensure!(
            model == "gpt2",
            "tokenizer model '{model}' is not supported: only byte-level BPE ('gpt2') tokenizers can be imported"
        );
        let tokens = string_array(f, "tokenizer.ggml.tokens")?;
        let merges = string_array(f, "tokenizer.ggml.merges")?;
        let token_types = match f.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                .ok_or_else(|| {
                    anyhow!("metadata tokenizer.ggml.token_type is not an integer array")
                })?,
        };
        ensure!(
            token_types.len() == tokens.len(),
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            token_types.len(),
            tokens.len()
        );
        let pre = f
            .get_str("tokenizer.ggml.pre")?
            .unwrap_or("default")
            .to_string();
        Ok(TokenizerMeta {
            tokens,
            token_types,
            merges,
            pre,
        })
    }
}

fn string_array(f: &GgufFile, key: &str) -> Result<Vec<String>> {
    let v = f
        .get(key)
        .ok_or_else(|| anyhow!("metadata key {key} is missing"))?;
    v.as_array()
        .and_then(|a| {
            a.iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| anyhow!("metadata key {key} is not a string array"))
}

/// The pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre`, in HF tokenizers form.
fn pre_tokenizer_json(pre: &str) -> Result<Json> {
    let byte_level = json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true });
    Ok(match pre {
        // llama.cpp splits every digit (\p{N}) before the GPT-2 regex, as SmolLM2's own
        // tokenizer.json does with Digits(individual_digits). transformers' GGUF loader
        // drops this split; we follow llama.cpp and the original model.
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [{ "type": "Digits", "individual_digits": true }, byte_level],
        }),
        "default" | "gpt-2" | "gpt2" => byte_level,
        other => bail!("tokenizer pre-tokenizer type '{other}' is not supported (supported: smollm, gpt-2, default)"),
    })
}

pub(crate) fn tokenizer_json(t: &TokenizerMeta) -> Result<Json> {
    let mut vocab = Map::new();
    for (id, tok) in t.tokens.iter().enumerate() {
        // Duplicate strings would silently shadow ids; llama.cpp vocabularies never have them.
        ensure!(
            vocab.insert(tok.clone(), json!(id)).is_none(),
            "token '{tok}' appears twice in the vocabulary"
        );
    }
    let merges = t
        .merges
        .iter()
        .map(|m| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| anyhow!("merge '{m}' is not two space-separated tokens"))?;
            Ok(json!([a, b]))
        })
        .collect::<Result<Vec<_>>>()?;
    let added: Vec<Json> = t
        .tokens
        .iter()
        .zip(&t.token_types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED || ty == TOKEN_TYPE_UNKNOWN)
        .map(|(id, (content, &ty))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty != TOKEN_TYPE_USER_DEFINED,
            })
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(&t.pre)?,
        // No BOS is added even though SmolLM2's GGUF says add_bos_token: its HF tokenizer and
        // transformers' GGUF loader add none, and the ChatML template opens with <|im_start|>.
        "post_processor": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true },
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// Loads the written tokenizer.json back with the tokenizers crate, so a file it cannot read
/// fails the import instead of a later run.
pub(crate) fn validate_tokenizer(path: &Path, n_tokens: usize) -> Result<()> {
    let tok = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow!("the generated {} does not load: {e}", path.display()))?;
    let size = tok.get_vocab_size(true);
    ensure!(
        size == n_tokens,
        "the generated tokenizer has {size} tokens, the GGUF vocabulary {n_tokens}"
    );
    Ok(())
}

pub(crate) fn tokenizer_config_json(f: &GgufFile, t: &TokenizerMeta, arch: &str) -> Result<Json> {
    let mut c = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": f.get_i64(&format!("{}.context_length", arch))?.unwrap_or(2048),
    });
    for (hf, gguf) in [
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("pad_token", "padding"),
        ("unk_token", "unknown"),
    ] {
        let Some(id) = f.get_i64(&format!("tokenizer.ggml.{gguf}_token_id"))? else {
            continue;
        };
        let tok = usize::try_from(id)
            .ok()
            .and_then(|i| t.tokens.get(i))
            .ok_or_else(|| {
                anyhow!(
                    "tokenizer.ggml.{gguf}_token_id {id} is outside the vocabulary of {}",
                    t.tokens.len()
                )
            })?;
        c[hf] = json!(tok);
    }
    if let Some(template) = f.get_str("tokenizer.chat_template")? {
        c["chat_template"] = json!(template);
    }
    Ok(c)
}
