//! Model directories with a real architecture and random weights (`clover init-random`), for
//! tests and benchmarks at 7B/8B shapes without downloading anything: an HF-style
//! `config.json`, `model.safetensors` (bf16, HF's N(0, 0.02) init, unit norms) and a word-level
//! `tokenizer.json` with the model's vocabulary size, so every command runs on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::model::config::LlamaConfig;
use crate::model::teacher::Teacher;

/// The architectures a random model can copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Like {
    /// Vicuna-7B v1.5 (LLaMA-2 7B): H 4096, 32 layers, 32 heads, vocab 32000, untied.
    #[value(name = "vicuna-7b")]
    Vicuna7b,
    /// LLaMA-3-8B-Instruct: H 4096, 32 layers, 32 heads / 8 KV heads, vocab 128256, theta 500000.
    #[value(name = "llama3-8b-instruct")]
    Llama3_8bInstruct,
    /// SmolLM2-135M-Instruct: H 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
}

/// The shape of a `Like` architecture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Architecture {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub vocab_size: i64,
    pub rope_theta: f64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
}

impl Like {
    /// The architecture with `layers` decoder layers instead of its own, if given.
    pub fn architecture_with(self, layers: Option<i64>) -> Result<Architecture> {
        let mut arch = self.architecture();
        if let Some(n) = layers {
            ensure!(n >= 1, "--layers must be at least 1, got {n}");
            arch.num_hidden_layers = n;
        }
        Ok(arch)
    }

    pub fn architecture(self) -> Architecture {
        match self {
            Like::Vicuna7b => Architecture {
                hidden_size: 4096,
                intermediate_size: 11008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: 32,
                vocab_size: 32000,
                rope_theta: 10000.0,
                max_position_embeddings: 4096,
                rms_norm_eps: 1e-5,
                tie_word_embeddings: false,
            },
            Like::Llama3_8bInstruct => Architecture {
                hidden_size: 4096,
                intermediate_size: 14336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                vocab_size: 128256,
                rope_theta: 500000.0,
                max_position_embeddings: 8192,
                rms_norm_eps: 1e-5,
                tie_word_embeddings: false,
            },
            Like::Smollm2_135m => Architecture {
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                vocab_size: 49152,
                rope_theta: 100000.0,
                max_position_embeddings: 8192,
                rms_norm_eps: 1e-5,
                tie_word_embeddings: true,
            },
        }
    }
}

/// Token ids of the special tokens every random tokenizer has.
const UNK: i64 = 0;
const BOS: i64 = 1;
const EOS: i64 = 2;

impl Architecture {
    /// The HF `config.json` of this architecture.
    pub fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.hidden_size / self.num_attention_heads,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "torch_dtype": "bfloat16",
        })
    }

    /// Every weight with its shape, in the HF LLaMA layout.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let head_dim = h / self.num_attention_heads;
        let (q, kv) = (
            self.num_attention_heads * head_dim,
            self.num_key_value_heads * head_dim,
        );
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = |n: &str| format!("model.layers.{l}.{n}");
            out.extend([
                (p("self_attn.q_proj.weight"), vec![q, h]),
                (p("self_attn.k_proj.weight"), vec![kv, h]),
                (p("self_attn.v_proj.weight"), vec![kv, h]),
                (p("self_attn.o_proj.weight"), vec![h, q]),
                (p("mlp.gate_proj.weight"), vec![i, h]),
                (p("mlp.up_proj.weight"), vec![i, h]),
                (p("mlp.down_proj.weight"), vec![h, i]),
                (p("input_layernorm.weight"), vec![h]),
                (p("post_attention_layernorm.weight"), vec![h]),
            ]);
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }
}

/// Random weights as HF initialises a LLaMA: N(0, 0.02) matrices, unit RMSNorm weights, bf16.
pub fn random_weights(arch: &Architecture, seed: i64) -> Vec<(String, Tensor)> {
    crate::rng::seeded(seed, || {
        arch.weight_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let t = if shape.len() == 1 {
                    Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
                } else {
                    Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02
                };
                (name, t.to_kind(Kind::BFloat16))
            })
            .collect()
    })
}

/// A word-level tokenizer over `vocab` ids: `<unk>`, `<s>`, `</s>`, then `w3`, `w4`, ... split
/// on whitespace, with a ChatML template so `--chat` and `--template auto` work.
fn tokenizer_files(vocab: i64) -> (serde_json::Value, serde_json::Value) {
    let mut words = serde_json::Map::new();
    for (id, special) in [(UNK, "<unk>"), (BOS, "<s>"), (EOS, "</s>")] {
        words.insert(special.into(), id.into());
    }
    for id in 3..vocab {
        words.insert(format!("w{id}"), id.into());
    }
    let added: Vec<_> = [(UNK, "<unk>"), (BOS, "<s>"), (EOS, "</s>")]
        .iter()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    });
    let config = json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": "{% for message in messages %}{{'<s>' + message['role'] + ' ' + message['content'] + '</s>'}}{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant ' }}{% endif %}",
    });
    (tokenizer, config)
}

/// Writes a model directory `out` with `like`'s architecture (`layers` decoder layers if given)
/// and random weights. Refuses a directory that already holds files.
pub fn write_random_model(like: Like, layers: Option<i64>, out: &Path, seed: i64) -> Result<()> {
    let arch = like.architecture_with(layers)?;
    let occupied = out
        .read_dir()
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    ensure!(
        !occupied,
        "{} already holds files: init-random writes a new model directory",
        out.display()
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let path = out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("writing {}", path.display()))
    };
    write_json("config.json", &arch.config_json())?;
    let (tokenizer, tokenizer_config) = tokenizer_files(arch.vocab_size);
    write_json("tokenizer.json", &tokenizer)?;
    write_json("tokenizer_config.json", &tokenizer_config)?;
    let weights = random_weights(&arch, seed);
    let file = out.join("model.safetensors");
    Tensor::write_safetensors(&weights, &file)
        .with_context(|| format!("writing {}", file.display()))
}

/// A teacher with `like`'s architecture and random weights, built in memory on `device` (for
/// benchmarks at 7B/8B shapes without writing gigabytes).
pub fn random_teacher(
    like: Like,
    layers: Option<i64>,
    device: Device,
    kind: Kind,
    seed: i64,
) -> Result<Teacher> {
    let arch = like.architecture_with(layers)?;
    let name = PathBuf::from(format!("<random {like:?}>"));
    let config = LlamaConfig::from_json(&arch.config_json().to_string(), &name)?;
    let weights: HashMap<String, Tensor> = random_weights(&arch, seed)
        .into_iter()
        .map(|(n, t)| (n, t.to_device(device).to_kind(kind)))
        .collect();
    Teacher::from_weights(config, &name, weights, device, kind)
}

/// Which teacher a benchmark runs: a model directory, or a random one of a named architecture
/// built in memory (`bench`, `bench-train`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TeacherSource {
    /// Teacher model directory.
    #[arg(long, required_unless_present = "like")]
    pub model: Option<PathBuf>,
    /// Instead of --model: a teacher of this architecture with random weights, built in memory.
    #[arg(long, value_enum, conflicts_with = "model")]
    pub like: Option<Like>,
    /// With --like: decoder layers (default: the architecture's own).
    #[arg(long, requires = "like", value_parser = crate::checks::positive_i64)]
    pub layers: Option<i64>,
}

impl TeacherSource {
    pub fn load(&self, device: Device, kind: Kind) -> Result<Teacher> {
        match (&self.model, self.like) {
            (Some(dir), _) => Teacher::load(dir, device, kind),
            (None, Some(like)) => random_teacher(like, self.layers, device, kind, 0),
            (None, None) => anyhow::bail!("give --model DIR or --like NAME"),
        }
    }

    /// How a report names the teacher.
    pub fn describe(&self) -> String {
        match (&self.model, self.like) {
            (Some(dir), _) => dir.display().to_string(),
            (None, Some(like)) => match self.layers {
                Some(n) => format!("random {like:?} ({n} layers)"),
                None => format!("random {like:?}"),
            },
            (None, None) => "no teacher".into(),
        }
    }
}
