//! A draft head's shape (copied from its teacher) and its Clover-2 hyper-parameters, and the
//! reference's `config.json` section it is exported with.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::checks::Problems;
use crate::model::config::{LlamaConfig, ModelShape};

/// The RoPE base of the reference draft: `LlamaAttention._init_rope` is called without
/// `rope_theta`, so the draft always uses 10000 even for LLaMA3 (θ=500000). G2.
pub const REFERENCE_DRAFT_ROPE_THETA: f64 = 10000.0;

/// Which draft architecture a head is (docs/heads.md): the project's Clover-2, or one of the two
/// baselines the paper compares against, trained and decoded by the same code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// Clover-2 (docs/clover2.md).
    #[default]
    Clover2,
    /// EAGLE-1: feature-level autoregression with one decoder layer (docs/heads.md §1).
    Eagle1,
    /// Medusa-1: one residual SiLU block and vocabulary projection per depth (docs/heads.md §2).
    Medusa,
    /// EAGLE-3: three teacher layers fused, one decoder layer over [embedding, state], its own
    /// lm_head over a draft vocabulary, trained with training-time test (docs/heads.md §6).
    Eagle3,
}

impl HeadKind {
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Clover2 => "clover2",
            HeadKind::Eagle1 => "eagle1",
            HeadKind::Medusa => "medusa",
            HeadKind::Eagle3 => "eagle3",
        }
    }
}

/// The Clover-2 hyper-parameters of a head, defined once: the training config and the head
/// config flatten this struct (the same keys, the same reference defaults), and export writes it
/// as the reference's `"clover"` section plus our `"clover_rs"` extras.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeadOptions {
    /// The architecture (`head = "clover2" | "eagle1" | "medusa" | "eagle3"`).
    pub head: HeadKind,
    /// Unrolled draft depths ("num_heads" in the reference): depth 0 + weight-tied depths 1..
    pub num_depths: i64,
    /// Augmenting-Block layers.
    pub num_layers: i64,
    /// Per-depth loss decay (`decay_coefficient`).
    pub decay: f64,
    pub heads_coefficient: f64,
    /// RoPE base of the draft's Augmenting Block. Default 10000 as the reference (G2), whatever the
    /// teacher's rope_theta; rope_scaling is likewise not applied (the reference's plain
    /// LlamaRotaryEmbedding has none).
    pub draft_rope_theta: f64,
    /// Which teacher layer initialises both Augmenting-Block layers. Default 0: the reference
    /// reads `model.layers.{draft_config.num_hidden_layers-1}` with the draft config's
    /// num_hidden_layers = 1, i.e. base layer 0 (G1), although its comments suggest the last layer.
    pub init_from_layer: i64,
    /// Weight of the feature-regression term; None = the head's reference (Clover-2 10, EAGLE-1
    /// 1, Medusa 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regression_weight: Option<f64>,
    /// Weight of the distillation term; None = the head's reference (Clover-2 1, EAGLE-1 0.1,
    /// Medusa 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distillation_weight: Option<f64>,
    /// Clover-2's regressive connection: depths >= 1 see the embedding of the token chosen at
    /// the depth before. Off (an ablation), they see a zero embedding, so every depth >= 1
    /// predicts from the carried state alone. Clover-2 only.
    pub regressive_connection: bool,
    /// Amplitude of EAGLE's uniform input-feature noise in training, U(-a/2, a/2) * 512 / T;
    /// None = the head's reference (EAGLE-1 0.2, others 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_noise: Option<f64>,
    /// A draft vocabulary (EAGLE-3): the head scores only the N most frequent answer tokens of
    /// the training data, trained against the teacher's distribution restricted to them. None:
    /// the full vocabulary. Clover-2 only (docs/clover2.md §5.1, `--draft-vocab`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_vocab: Option<usize>,
    /// EAGLE-3's training-time test: the draft is unrolled this many steps in training, each
    /// attending to its own earlier outputs. None = the reference's 7. EAGLE-3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttt_steps: Option<i64>,
    /// The teacher layers whose inputs an EAGLE-3 draft reads (low, middle, high); an id equal
    /// to the teacher's layer count is its last pre-norm state. None = [2, L/2, L-3] of an
    /// L-layer teacher. EAGLE-3 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_layers: Option<Vec<i64>>,
}

impl Default for HeadOptions {
    /// The reference: 5 depths, 2 Augmenting-Block layers, decay 0.7, coefficient 1, RoPE 10000,
    /// both layers from teacher layer 0.
    fn default() -> Self {
        HeadOptions {
            head: HeadKind::Clover2,
            num_depths: 5,
            num_layers: 2,
            decay: 0.7,
            heads_coefficient: 1.0,
            draft_rope_theta: REFERENCE_DRAFT_ROPE_THETA,
            init_from_layer: 0,
            regression_weight: None,
            distillation_weight: None,
            regressive_connection: true,
            input_noise: None,
            draft_vocab: None,
            ttt_steps: None,
            teacher_layers: None,
        }
    }
}

impl HeadOptions {
    /// Records every out-of-range option. The rules of the head's kind (which options apply to
    /// it) are `HeadArch::check_options`, which `HeadConfig::validate` and the training config
    /// add.
    pub fn check(&self, p: &mut Problems) {
        for (name, value) in [
            ("regression_weight", self.regression_weight),
            ("distillation_weight", self.distillation_weight),
            ("input_noise", self.input_noise),
        ] {
            if let Some(v) = value {
                p.require(
                    v.is_finite() && v >= 0.0,
                    name,
                    format!("{v} is not a finite number >= 0"),
                );
            }
        }
        p.require(
            self.num_depths >= 1,
            "num_depths",
            format!("{} < 1", self.num_depths),
        );
        p.require(
            self.num_layers >= 1,
            "num_layers",
            format!("{} < 1", self.num_layers),
        );
        p.require(
            self.decay.is_finite() && self.decay > 0.0 && self.decay <= 1.0,
            "decay",
            format!("{} is outside (0, 1]", self.decay),
        );
        p.require(
            self.heads_coefficient.is_finite() && self.heads_coefficient >= 0.0,
            "heads_coefficient",
            format!("{} is not a finite number >= 0", self.heads_coefficient),
        );
        p.require_positive("draft_rope_theta", self.draft_rope_theta);
        p.require(
            self.init_from_layer >= 0,
            "init_from_layer",
            format!("{} < 0", self.init_from_layer),
        );
        if let Some(n) = self.draft_vocab {
            p.require(
                n >= 1,
                "draft_vocab",
                "0 tokens: leave it out for the full vocabulary",
            );
        }
        if let Some(n) = self.ttt_steps {
            p.require(n >= 1, "ttt_steps", format!("{n} < 1"));
        }
        if let Some(layers) = &self.teacher_layers {
            let distinct: std::collections::BTreeSet<_> = layers.iter().collect();
            p.require(
                !layers.is_empty()
                    && layers.iter().all(|&l| l >= 0)
                    && distinct.len() == layers.len(),
                "teacher_layers",
                format!("{layers:?} is not a non-empty list of distinct layer ids >= 0"),
            );
        }
    }
}

/// The reference's `ConfigClover` section of an exported config.json, under its own key names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct CloverSection {
    num_heads: i64,
    num_layers: i64,
    heads_coefficient: f64,
    decay_coefficient: f64,
}

/// Our settings the reference's config has no field for (kept out of `"clover"` so the reference's
/// `ConfigClover(**section)` does not see unknown keywords).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct CloverRsSection {
    draft_rope_theta: f64,
    init_from_layer: i64,
    head: HeadKind,
    regressive_connection: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    draft_vocab: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttt_steps: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    teacher_layers: Option<Vec<i64>>,
}

impl From<&HeadOptions> for CloverSection {
    fn from(o: &HeadOptions) -> Self {
        CloverSection {
            num_heads: o.num_depths,
            num_layers: o.num_layers,
            heads_coefficient: o.heads_coefficient,
            decay_coefficient: o.decay,
        }
    }
}

impl From<&HeadOptions> for CloverRsSection {
    fn from(o: &HeadOptions) -> Self {
        CloverRsSection {
            draft_rope_theta: o.draft_rope_theta,
            init_from_layer: o.init_from_layer,
            head: o.head,
            regressive_connection: o.regressive_connection,
            draft_vocab: o.draft_vocab,
            ttt_steps: o.ttt_steps,
            teacher_layers: o.teacher_layers.clone(),
        }
    }
}

impl Default for CloverSection {
    fn default() -> Self {
        (&HeadOptions::default()).into()
    }
}

impl Default for CloverRsSection {
    fn default() -> Self {
        (&HeadOptions::default()).into()
    }
}

/// What `HeadConfig::from_export_json` reads: the teacher's shape keys and the two sections.
#[derive(Deserialize)]
struct ExportedConfig {
    hidden_size: i64,
    intermediate_size: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    vocab_size: i64,
    /// The same default as `LlamaConfig`.
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    clover: CloverSection,
    #[serde(default)]
    clover_rs: CloverRsSection,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// Shape and hyper-parameters of a draft head. The LLaMA shape fields are copied from the
/// teacher; the options mirror the reference's `ConfigClover` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub rms_norm_eps: f64,
    #[serde(flatten)]
    pub options: HeadOptions,
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
            options: HeadOptions::default(),
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
            (0..cfg.num_hidden_layers).contains(&self.options.init_from_layer),
            "init_from_layer {} is outside the teacher's {} layers",
            self.options.init_from_layer,
            cfg.num_hidden_layers
        );
        if let Some(layers) = &self.options.teacher_layers {
            ensure!(
                layers.iter().all(|&l| l <= cfg.num_hidden_layers),
                "teacher_layers {layers:?} name a layer past the teacher's {} (the last id, {}, \
                 is its final pre-norm state)",
                cfg.num_hidden_layers,
                cfg.num_hidden_layers
            );
        }
        Ok(())
    }

    /// The `"clover"` section of the exported config.json, as the reference's `ConfigClover`.
    pub fn clover_section(&self) -> serde_json::Value {
        serde_json::to_value(CloverSection::from(&self.options)).unwrap_or_default()
    }

    /// The `"clover_rs"` section: our options the reference has no field for.
    pub fn clover_rs_section(&self) -> serde_json::Value {
        serde_json::to_value(CloverRsSection::from(&self.options)).unwrap_or_default()
    }

    /// Reads an exported config.json (LlamaConfig fields + "clover" + optional "clover_rs").
    pub fn from_export_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: ExportedConfig = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not an exported draft head config (teacher shape keys and a \"clover\" \
                 section)",
                path.display()
            )
        })?;
        let cfg = HeadConfig {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c
                .head_dim
                .unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            options: HeadOptions {
                head: c.clover_rs.head,
                regressive_connection: c.clover_rs.regressive_connection,
                draft_vocab: c.clover_rs.draft_vocab,
                ttt_steps: c.clover_rs.ttt_steps,
                teacher_layers: c.clover_rs.teacher_layers,
                num_depths: c.clover.num_heads,
                num_layers: c.clover.num_layers,
                decay: c.clover.decay_coefficient,
                heads_coefficient: c.clover.heads_coefficient,
                draft_rope_theta: c.clover_rs.draft_rope_theta,
                init_from_layer: c.clover_rs.init_from_layer,
                ..HeadOptions::default()
            },
        };
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// The shape fields this head copied from its teacher.
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

    /// Records out-of-range values: the shape by the rule a teacher's config.json is held to
    /// (`ModelShape::check`), the options by the training config's (`HeadOptions::check`), so an
    /// exported head is held to what training would have accepted.
    pub fn check(&self, p: &mut Problems) {
        self.shape().check(p);
        self.options.check(p);
    }

    /// Refuses, all at once, what `check` records (`model::kinds::validate` adds the rules of
    /// the head's kind).
    pub fn validate(&self, origin: &str) -> Result<()> {
        let mut p = Problems::default();
        self.check(&mut p);
        p.into_result(origin)
    }
}
