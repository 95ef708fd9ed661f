//! A LLaMA-family `config.json`: shape, RoPE (theta and llama3-style scaling), special tokens.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

use crate::checks::Problems;

/// llama3-style frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max")]
    pub original_max_position_embeddings: i64,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_original_max() -> i64 {
    8192
}

/// The fields of an HF `config.json` that a LLaMA-family decoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: i64,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

/// `eos_token_id` is an int in most configs and a list in LLaMA3's.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize)]
struct RawConfig {
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    vocab_size: i64,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeScaling>,
    /// transformers 5 writes `rope_theta` and the scaling fields together under this key.
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<i64>,
    bos_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
    model_type: Option<String>,
}

impl LlamaConfig {
    /// The shape fields a draft head copies.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a config.json; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .with_context(|| format!("{} is not a LLaMA-style config.json", path.display()))?;
        if let Some(t) = raw.model_type.as_deref() {
            ensure!(
                matches!(t, "llama" | "mistral" | "qwen2" | "smollm" | "smollm2"),
                "{}: model_type {t:?} is not a LLaMA-family decoder",
                path.display()
            );
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let (rope_theta, rope_scaling) = rope_settings(&raw, path)?;
        let eos_token_ids = match raw.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => vec![],
        };
        let config = Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
        };
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Refuses, all at once, values no model can have, before any weight is read: libtorch
    /// would panic on some (a negative epsilon) and silently compute garbage with others (a
    /// RoPE base <= 0 gives NaN angles).
    pub fn validate(&self, origin: &str) -> Result<()> {
        let mut p = Problems::default();
        self.shape().check(&mut p);
        p.require(
            self.num_hidden_layers >= 1,
            "num_hidden_layers",
            format!("{} < 1", self.num_hidden_layers),
        );
        p.require_positive("rope_theta", self.rope_theta);
        p.require(
            self.max_position_embeddings >= 1,
            "max_position_embeddings",
            format!("{} < 1", self.max_position_embeddings),
        );
        if let Some(s) = &self.rope_scaling {
            s.check(&mut p);
        }
        p.into_result(origin)
    }
}

impl RopeScaling {
    /// llama3 scaling divides by `factor`, by both frequency factors and by their difference.
    fn check(&self, p: &mut Problems) {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        p.require(
            positive(self.factor),
            "rope_scaling.factor",
            format!("{} is not a finite number > 0", self.factor),
        );
        p.require(
            positive(self.low_freq_factor)
                && self.high_freq_factor.is_finite()
                && self.high_freq_factor > self.low_freq_factor,
            "rope_scaling.high_freq_factor",
            format!(
                "{} must be finite and above low_freq_factor {} > 0",
                self.high_freq_factor, self.low_freq_factor
            ),
        );
        p.require(
            self.original_max_position_embeddings >= 1,
            "rope_scaling.original_max_position_embeddings",
            format!("{} < 1", self.original_max_position_embeddings),
        );
    }
}

/// RoPE base and scaling from either the transformers 4 keys (`rope_theta`, `rope_scaling`) or
/// the transformers 5 `rope_parameters` object.
fn rope_settings(raw: &RawConfig, path: &Path) -> Result<(f64, Option<RopeScaling>)> {
    let mut theta = raw.rope_theta;
    let mut scaling = raw.rope_scaling.clone();
    if let Some(params) = &raw.rope_parameters {
        theta = theta.or(params.get("rope_theta").and_then(|v| v.as_f64()));
        if scaling.is_none() && params.get("rope_type").is_some() {
            scaling = Some(serde_json::from_value(params.clone()).with_context(|| {
                format!(
                    "{}: rope_parameters is not a rope scaling object",
                    path.display()
                )
            })?);
        }
    }
    let scaling = scaling.filter(|s| s.rope_type != "default");
    if let Some(s) = &scaling {
        ensure!(
            s.rope_type == "llama3",
            "{}: rope scaling type {:?} is not supported (only llama3)",
            path.display(),
            s.rope_type
        );
    }
    Ok((theta.unwrap_or(10000.0), scaling))
}

/// The shape fields a draft head copies from its teacher (`HeadConfig::shape`), so one rule
/// checks a teacher's config.json and an exported head's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub rms_norm_eps: f64,
}

impl ModelShape {
    /// Records every shape value no weights can have: an empty dimension, heads that do not
    /// divide the hidden size or each other, an odd head dimension (RoPE rotates its two
    /// halves), an RMSNorm epsilon that is not a positive number (the norm would divide by zero
    /// or take the root of a negative number). These are the fields a head copies from its
    /// teacher, and a teacher's config.json is checked through that copy
    /// (`LlamaConfig::validate`): one rule for both.
    pub fn check(&self, p: &mut Problems) {
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
        ] {
            p.require(value >= 1, name, format!("{value} < 1"));
        }
        p.require(
            self.head_dim >= 2 && self.head_dim % 2 == 0,
            "head_dim",
            format!(
                "{} is not an even number >= 2 (RoPE rotates two halves)",
                self.head_dim
            ),
        );
        for (name, whole, part_name, part) in [
            (
                "hidden_size",
                self.hidden_size,
                "num_attention_heads",
                self.num_attention_heads,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                "num_key_value_heads",
                self.num_key_value_heads,
            ),
        ] {
            if part >= 1 {
                p.require(
                    whole % part == 0,
                    name,
                    format!("{whole} is not divisible by {part_name} {part}"),
                );
            }
        }
        p.require_positive("rms_norm_eps", self.rms_norm_eps);
    }
}
