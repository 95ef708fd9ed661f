//! A draft head's shape (copied from its teacher) and its Clover-2 hyper-parameters, and the
//! reference's `config.json` section it is exported with.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::config::LlamaConfig;

/// The RoPE base of the reference draft: `LlamaAttention._init_rope` is called without
/// `rope_theta`, so the draft always uses 10000 even for LLaMA3 (θ=500000). G2.
pub const REFERENCE_DRAFT_ROPE_THETA: f64 = 10000.0;

fn default_num_depths() -> i64 {
    5
}
fn default_num_layers() -> i64 {
    2
}
fn default_decay() -> f64 {
    0.7
}
fn default_heads_coefficient() -> f64 {
    1.0
}
fn default_draft_rope_theta() -> f64 {
    REFERENCE_DRAFT_ROPE_THETA
}

/// Shape and hyper-parameters of a draft head. The LLaMA shape fields are copied from the
/// teacher; the clover fields mirror the reference's `ConfigClover` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub rms_norm_eps: f64,
    /// Unrolled draft depths ("num_heads" in the reference): depth 0 + weight-tied depths 1..
    #[serde(default = "default_num_depths")]
    pub num_depths: i64,
    /// Augmenting-Block layers.
    #[serde(default = "default_num_layers")]
    pub num_layers: i64,
    /// Per-depth loss decay (`decay_coefficient`).
    #[serde(default = "default_decay")]
    pub decay: f64,
    #[serde(default = "default_heads_coefficient")]
    pub heads_coefficient: f64,
    /// RoPE base of the draft's Augmenting Block. Default 10000 as the reference (G2), whatever the
    /// teacher's rope_theta; rope_scaling is likewise not applied (the reference's plain
    /// LlamaRotaryEmbedding has none).
    #[serde(default = "default_draft_rope_theta")]
    pub draft_rope_theta: f64,
    /// Which teacher layer initialises both Augmenting-Block layers. Default 0: the reference
    /// reads `model.layers.{draft_config.num_hidden_layers-1}` with the draft config's
    /// num_hidden_layers = 1, i.e. base layer 0 (G1), although its comments suggest the last layer.
    #[serde(default)]
    pub init_from_layer: i64,
}

impl HeadConfig {
    /// The reference defaults (5 depths, 2 layers, decay 0.7) over the teacher's shape.
    pub fn from_teacher(cfg: &LlamaConfig) -> Self {
        HeadConfig {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            rms_norm_eps: cfg.rms_norm_eps,
            num_depths: default_num_depths(),
            num_layers: default_num_layers(),
            decay: default_decay(),
            heads_coefficient: default_heads_coefficient(),
            draft_rope_theta: default_draft_rope_theta(),
            init_from_layer: 0,
        }
    }

    /// Checks the head matches the teacher it is attached to.
    pub fn check_against(&self, cfg: &LlamaConfig) -> Result<()> {
        let pairs = [
            ("hidden_size", self.hidden_size, cfg.hidden_size),
            (
                "intermediate_size",
                self.intermediate_size,
                cfg.intermediate_size,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                cfg.num_attention_heads,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                cfg.num_key_value_heads,
            ),
            ("head_dim", self.head_dim, cfg.head_dim),
            ("vocab_size", self.vocab_size, cfg.vocab_size),
        ];
        for (name, head, teacher) in pairs {
            ensure!(
                head == teacher,
                "draft head {name} = {head} but the teacher has {teacher}"
            );
        }
        ensure!(
            self.num_depths >= 1,
            "num_depths must be >= 1, got {}",
            self.num_depths
        );
        ensure!(
            self.num_layers >= 1,
            "num_layers must be >= 1, got {}",
            self.num_layers
        );
        ensure!(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size {} is not a multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            (0..cfg.num_hidden_layers).contains(&self.init_from_layer),
            "init_from_layer {} is outside the teacher's {} layers",
            self.init_from_layer,
            cfg.num_hidden_layers
        );
        Ok(())
    }

    /// The teacher's LlamaConfig reshaped for the draft's Augmenting Block (layer count, RoPE).
    pub fn draft_llama_config(&self, teacher: &LlamaConfig) -> LlamaConfig {
        let mut cfg = teacher.clone();
        cfg.num_hidden_layers = self.num_layers;
        cfg.rope_theta = self.draft_rope_theta;
        cfg.rope_scaling = None;
        cfg
    }

    /// Every trainable tensor of the head with its reference name and shape (docs/clover2.md §1.4).
    pub fn trainable_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q_out = self.num_attention_heads * self.head_dim;
        let kv_out = self.num_key_value_heads * self.head_dim;
        let mut out: Vec<(String, Vec<i64>)> = Vec::new();
        for l in 0..self.num_layers {
            let p = format!("layers.{l}");
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q_out, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv_out, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv_out, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q_out]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("clover_norm.weight".into(), vec![h]));
        out.push(("clover_head_norm.weight".into(), vec![h]));
        out.push(("clover_head_mlp.weight".into(), vec![h, h]));
        out.push(("clover_head_mlp.bias".into(), vec![h]));
        out.push(("clover_head_mlp2.weight".into(), vec![h, 2 * h]));
        out.push(("clover_head_mlp2.bias".into(), vec![h]));
        for cell in ["clover_head_mlp_rnn", "clover_head_mlp_rnn2"] {
            out.push((format!("{cell}.input_layernorm.weight"), vec![h]));
            for proj in ["q", "k", "v"] {
                out.push((format!("{cell}.{proj}.weight"), vec![h, h]));
                out.push((format!("{cell}.{proj}.bias"), vec![h]));
            }
        }
        out
    }

    /// The `"clover"` section of the exported config.json, as the reference's `ConfigClover`.
    pub fn clover_section(&self) -> serde_json::Value {
        serde_json::json!({
            "num_heads": self.num_depths,
            "num_layers": self.num_layers,
            "heads_coefficient": self.heads_coefficient,
            "decay_coefficient": self.decay,
        })
    }

    /// Our extra settings the reference's config has no field for (kept out of `"clover"` so the
    /// reference's `ConfigClover(**section)` does not see unknown keywords).
    pub fn clover_rs_section(&self) -> serde_json::Value {
        serde_json::json!({
            "draft_rope_theta": self.draft_rope_theta,
            "init_from_layer": self.init_from_layer,
        })
    }

    /// Reads an exported config.json (LlamaConfig fields + "clover" + optional "clover_rs").
    pub fn from_export_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let int = |k: &str| -> Result<i64> {
            v.get(k)
                .and_then(|x| x.as_i64())
                .with_context(|| format!("{}: missing integer {k}", path.display()))
        };
        let hidden_size = int("hidden_size")?;
        let num_attention_heads = int("num_attention_heads")?;
        let clover = v
            .get("clover")
            .with_context(|| format!("{}: no \"clover\" section", path.display()))?;
        let rs = v.get("clover_rs");
        let head_dim = match v.get("head_dim").and_then(|x| x.as_i64()) {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };
        Ok(HeadConfig {
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_attention_heads,
            num_key_value_heads: v
                .get("num_key_value_heads")
                .and_then(|x| x.as_i64())
                .unwrap_or(num_attention_heads),
            head_dim,
            vocab_size: int("vocab_size")?,
            // The same default as teacher::LlamaConfig.
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            num_depths: clover
                .get("num_heads")
                .and_then(|x| x.as_i64())
                .unwrap_or(default_num_depths()),
            num_layers: clover
                .get("num_layers")
                .and_then(|x| x.as_i64())
                .unwrap_or(default_num_layers()),
            decay: clover
                .get("decay_coefficient")
                .and_then(|x| x.as_f64())
                .unwrap_or(default_decay()),
            heads_coefficient: clover
                .get("heads_coefficient")
                .and_then(|x| x.as_f64())
                .unwrap_or(default_heads_coefficient()),
            draft_rope_theta: rs
                .and_then(|r| r.get("draft_rope_theta"))
                .and_then(|x| x.as_f64())
                .unwrap_or(REFERENCE_DRAFT_ROPE_THETA),
            init_from_layer: rs
                .and_then(|r| r.get("init_from_layer"))
                .and_then(|x| x.as_i64())
                .unwrap_or(0),
        })
    }
}
