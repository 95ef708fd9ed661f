//! The TOML training config (with its `[cuda]` override table) and test-only hooks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::checks::{Problems, MAX_COUNT};
use crate::model::device::parse_device;
use crate::model::head_config::{HeadConfig, HeadOptions};
use crate::model::teacher::Teacher;
use crate::training::batches::Batching;
use crate::training::distill_loss::{DistillLossName, DEFAULT_LK_ETA};
use crate::training::loss::LossWeights;

fn d_auto() -> String {
    "auto".into()
}
fn d_lr() -> f64 {
    1e-3
}
fn d_betas() -> (f64, f64) {
    (0.9, 0.95)
}
fn d_wd() -> f64 {
    0.01
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    0.5
}
fn d_max_len() -> usize {
    2048
}
fn d_batch_tokens() -> usize {
    4096
}
/// The default `loss_chunk`: 2048 positions × 128,256 f32 logits ≈ 1 GiB per tensor for LLaMA-3.
pub const DEFAULT_LOSS_CHUNK: usize = 2048;
fn d_loss_chunk() -> usize {
    DEFAULT_LOSS_CHUNK
}
fn d_window() -> usize {
    64
}
fn d_keep() -> usize {
    3
}
fn d_every() -> u64 {
    500
}
fn d_true() -> bool {
    true
}
fn d_eval_samples() -> usize {
    64
}

/// The `depth_weighting` key: how the per-depth loss terms are weighted (docs/losses.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthWeighting {
    /// decay^i · heads_coefficient (Clover-2's reference).
    #[default]
    Decay,
    /// exp(−i/γ) · heads_coefficient, γ = `depth_gamma` (DFlash, DSpark).
    Exp,
}

impl DepthWeighting {
    fn is_default(&self) -> bool {
        *self == DepthWeighting::default()
    }
}

/// Which overrides of a training config apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Profile {
    /// The `[cuda]` table when the run lands on a CUDA device.
    #[default]
    Auto,
    /// Never the `[cuda]` table.
    Cpu,
    /// Always the `[cuda]` table.
    Cuda,
}

/// The TOML training config. A `[cuda]` table overrides any top-level key when the run lands on a
/// CUDA device (so one file fits the 2-core CPU and a GPU).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// HF-style teacher dir (config.json + model.safetensors).
    pub model_dir: PathBuf,
    /// Prepared parquet dir (`clover prepare`), read with `data::read_split`.
    pub data_dir: PathBuf,
    /// Offline mode: a `clover distill` cache of the train split; absent = online teacher.
    #[serde(default)]
    pub distill_cache: Option<PathBuf>,
    pub out_dir: PathBuf,
    /// auto | cpu | cuda | cuda:N
    #[serde(default = "d_auto")]
    pub device: String,
    /// Start from an exported head dir instead of the reference init.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// The head's options (`num_depths`, `num_layers`, `decay`, `heads_coefficient`,
    /// `draft_rope_theta`, `init_from_layer`) as top-level keys, with the reference's defaults.
    #[serde(flatten)]
    pub head: HeadOptions,
    // --- length of training ---
    /// Passes over the train split (the reference runs 21, G14). Used when max_steps is absent.
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Optimizer steps; overrides epochs.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Token batching: padded tokens per step (rows × longest row), one batch per step. Used
    /// when `conversations_per_step` is absent.
    #[serde(default = "d_batch_tokens")]
    pub batch_tokens: usize,
    /// The reference's batching: this many conversations per optimizer step (the paper's global
    /// batch is 16), split into micro-batches of at most `micro_batch_tokens` padded tokens whose
    /// gradients are accumulated, each with its own loss normaliser (docs/clover2.md §2.2), as
    /// the reference's per-GPU batches are averaged. Set both or neither.
    #[serde(default)]
    pub conversations_per_step: Option<usize>,
    #[serde(default)]
    pub micro_batch_tokens: Option<usize>,
    /// Samples are truncated to this many tokens (reference 2048).
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// Use at most this many train samples (None = all).
    #[serde(default)]
    pub max_train_samples: Option<usize>,
    /// Samples per shuffled window that is sorted by length before cutting batches.
    #[serde(default = "d_window")]
    pub bucket_window: usize,
    /// Masked positions per lm_head pass of the loss (`training::loss::clover_loss_chunked`): at
    /// most about loss_chunk × vocab logits are alive per depth; 0 = all at once (the teacher
    /// distribution [M,V] and every depth's [n,V] logits materialised, far more memory for a
    /// large vocabulary, e.g. LLaMA-3's 128,256). Same loss and gradients up to round-off.
    #[serde(default = "d_loss_chunk")]
    pub loss_chunk: usize,
    // --- the loss's distillation term and depth weights (docs/losses.md); left out, the
    // reference's, and a config without them serialises as before ---
    /// soft_ce (Clover-2's soft cross-entropy) | forward_kl | tv | lk | lk_alpha.
    #[serde(default, skip_serializing_if = "DistillLossName::is_default")]
    pub distill_loss: DistillLossName,
    /// η of `distill_loss = "lk"`: per row λ = exp(−η·α) weighs KL against TV (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lk_eta: Option<f64>,
    /// decay (decay^i · heads_coefficient) | exp (exp(−i/depth_gamma) · heads_coefficient).
    #[serde(default, skip_serializing_if = "DepthWeighting::is_default")]
    pub depth_weighting: DepthWeighting,
    /// γ of `depth_weighting = "exp"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth_gamma: Option<f64>,
    // --- optimizer (reference: AdamW 1e-3, (0.9,0.95), wd 0.01, clip by value 0.5) ---
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_betas")]
    pub betas: (f64, f64),
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_eps")]
    pub adam_eps: f64,
    #[serde(default = "d_clip")]
    pub clip_value: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Length of the linear decay (get_linear_schedule_with_warmup's total); default = the run's
    /// steps. The reference's 1.6M is far beyond its ~85k steps, so its LR barely decays (§2.3).
    #[serde(default)]
    pub schedule_steps: Option<u64>,
    // --- bookkeeping ---
    #[serde(default = "d_every")]
    pub eval_every: u64,
    #[serde(default = "d_every")]
    pub save_every: u64,
    #[serde(default = "d_keep")]
    pub keep_last: usize,
    #[serde(default = "d_eval_samples")]
    pub eval_samples: usize,
    /// Drafts in the chain of the held-out tau estimate (default num_depths, at most 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau_chain_depth: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    /// bf16 autocast with f32 master weights on CUDA (the reference's accelerate bf16): matrix
    /// products in bf16, stream, norms and loss in f32 (`DraftHead::set_compute_kind`).
    #[serde(default = "d_true")]
    pub bf16_on_cuda: bool,
    /// The same autocast on the CPU (slower there than f32; it runs the mixed-precision path
    /// where no GPU is at hand, e.g. in tests).
    #[serde(default)]
    pub bf16_on_cpu: bool,
    /// Progress bar on stderr.
    #[serde(default = "d_true")]
    pub progress: bool,
}

impl TrainConfig {
    /// The paths a run reads, named by their keys: `out_dir` may be none of them.
    pub fn inputs(&self) -> Vec<(&'static str, &std::path::Path)> {
        let mut inputs = vec![
            ("model_dir", self.model_dir.as_path()),
            ("data_dir", self.data_dir.as_path()),
        ];
        inputs.extend(self.distill_cache.as_deref().map(|p| ("distill_cache", p)));
        inputs.extend(self.init_from.as_deref().map(|p| ("init_from", p)));
        inputs
    }

    /// Parses TOML, applying the `[cuda]` table when `device` resolves to CUDA.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        Self::from_toml_with_overrides(text, origin, Profile::Auto, &[])
    }

    /// As `from_toml`, with `profile` = cuda | cpu | auto saying whether the `[cuda]` table
    /// applies, then `KEY=VALUE` overrides (`clover train --set`) replacing top-level keys after
    /// the profile: VALUE is TOML (`max_steps=5`, `head="eagle1"`), or a bare string when it does
    /// not parse as TOML (`out_dir=/tmp/run`).
    pub fn from_toml_with_overrides(
        text: &str,
        origin: &str,
        profile: Profile,
        overrides: &[String],
    ) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).with_context(|| format!("parsing {origin}"))?;
        let cuda = table.remove("cuda");
        let device = table
            .get("device")
            .and_then(|v| v.as_str())
            .unwrap_or("auto")
            .to_string();
        let use_cuda_table = match profile {
            Profile::Cuda => true,
            Profile::Cpu => false,
            Profile::Auto => parse_device(&device)?.is_cuda(),
        };
        if use_cuda_table {
            if let Some(toml::Value::Table(over)) = cuda {
                for (k, v) in over {
                    table.insert(k, v);
                }
            }
        }
        for item in overrides {
            let (key, value) = parse_override(item)?;
            table.insert(key, value);
        }
        let cfg: Self = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("{origin}: invalid training config"))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// The valid range of every numeric field, checked once at load: a nonsense value (a
    /// negative learning rate, an empty batch) is refused before any work, all of them at once.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let mut p = Problems::default();
        crate::model::kinds::check_options(&self.head, &mut p);
        crate::training::tau_estimate::check_chain_depth(self.tau_chain_depth, &self.head, &mut p);
        self.check_paths(&mut p);
        self.check_batching(&mut p);
        self.check_loss(&mut p);
        self.check_optimizer(&mut p);
        self.check_schedule(&mut p);
        p.into_result(origin)
    }

    /// The directories a run reads and writes are named.
    fn check_paths(&self, p: &mut Problems) {
        for (key, path) in [
            ("model_dir", &self.model_dir),
            ("data_dir", &self.data_dir),
            ("out_dir", &self.out_dir),
        ] {
            // An empty path is the working directory: never what a user meant to write into.
            p.require(
                !path.to_string_lossy().trim().is_empty(),
                key,
                "is empty: name a directory",
            );
        }
    }

    /// How much a run trains on, and in what batches.
    fn check_batching(&self, p: &mut Problems) {
        p.require(
            self.max_steps != Some(0),
            "max_steps",
            "0: nothing to train",
        );
        p.require(self.epochs != Some(0), "epochs", "0: nothing to train");
        p.require(
            self.max_len >= 2,
            "max_len",
            format!("{} < 2 (one input and one target token)", self.max_len),
        );
        // A row needs 2 tokens; that the longest row of the data fits is checked against the
        // data before the first step (`trainer::train`).
        p.require(
            self.batch_tokens >= 2,
            "batch_tokens",
            format!("{} is below one row (2 tokens)", self.batch_tokens),
        );
        match (self.conversations_per_step, self.micro_batch_tokens) {
            (Some(n), Some(tokens)) => {
                p.require(n >= 1, "conversations_per_step", "0: an empty step");
                p.require(
                    tokens >= 2,
                    "micro_batch_tokens",
                    format!("{tokens} is below one row (2 tokens)"),
                );
            }
            (Some(_), None) => p.require(
                false,
                "micro_batch_tokens",
                "missing: conversations_per_step needs the micro-batch size",
            ),
            (None, Some(_)) => p.require(
                false,
                "conversations_per_step",
                "missing: micro_batch_tokens applies only to conversation batching",
            ),
            (None, None) => {}
        }
        p.require(
            self.max_train_samples != Some(0),
            "max_train_samples",
            "0: no data to train on",
        );
        p.require(self.bucket_window >= 1, "bucket_window", "0 < 1");
        p.require(
            self.loss_chunk <= MAX_COUNT,
            "loss_chunk",
            format!(
                "{} is too large: use at most {MAX_COUNT} (0 = unchunked)",
                self.loss_chunk
            ),
        );
    }

    /// The distillation term's and the depth weights' parameters: each set only where it
    /// applies, and in range.
    fn check_loss(&self, p: &mut Problems) {
        if let Some(eta) = self.lk_eta {
            p.require(
                self.distill_loss == DistillLossName::Lk,
                "lk_eta",
                format!(
                    "applies only to distill_loss = \"lk\" (this config's is \"{}\")",
                    self.distill_loss.as_str()
                ),
            );
            p.require_positive("lk_eta", eta);
        }
        match (self.depth_weighting, self.depth_gamma) {
            (DepthWeighting::Exp, Some(gamma)) => p.require_positive("depth_gamma", gamma),
            (DepthWeighting::Exp, None) => p.require(
                false,
                "depth_gamma",
                "missing: depth_weighting = \"exp\" weighs depth i by exp(-i/depth_gamma)",
            ),
            (DepthWeighting::Decay, Some(_)) => p.require(
                false,
                "depth_gamma",
                "applies only to depth_weighting = \"exp\"",
            ),
            (DepthWeighting::Decay, None) => {}
        }
    }

    /// AdamW's settings and the gradient clip.
    fn check_optimizer(&self, p: &mut Problems) {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        p.require(
            positive(self.lr),
            "lr",
            format!("{} is not a finite number > 0", self.lr),
        );
        let beta = |b: f64| (0.0..1.0).contains(&b);
        p.require(
            beta(self.betas.0) && beta(self.betas.1),
            "betas",
            format!("{:?}: each must be in [0, 1)", self.betas),
        );
        p.require(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay",
            format!("{} is not a finite number >= 0", self.weight_decay),
        );
        p.require(
            positive(self.adam_eps),
            "adam_eps",
            format!("{} is not a finite number > 0", self.adam_eps),
        );
        p.require(
            positive(self.clip_value),
            "clip_value",
            format!("{} is not a finite number > 0", self.clip_value),
        );
    }

    /// Warm-up and schedule against the run length; checkpoints and evaluation.
    fn check_schedule(&self, p: &mut Problems) {
        if let Some(steps) = self.max_steps {
            // A run that warms up for its whole length never reaches its lr (one step of
            // warm-up in a one-step run trains at lr 0: a run that changes nothing).
            p.require(
                self.warmup_steps == 0 || self.warmup_steps < steps,
                "warmup_steps",
                format!(
                    "{} must be below max_steps = {steps} (or 0)",
                    self.warmup_steps
                ),
            );
        }
        if let Some(total) = self.schedule_steps {
            p.require(
                total >= 1 && self.warmup_steps <= total,
                "schedule_steps",
                format!(
                    "{total} must be >= 1 and >= warmup_steps = {}",
                    self.warmup_steps
                ),
            );
        }
        p.require(self.save_every >= 1, "save_every", "0 < 1");
        p.require(
            self.keep_last >= 1,
            "keep_last",
            "0 < 1 (the newest checkpoint is always kept)",
        );
        p.require(
        self.eval_every == 0 || self.eval_samples >= 1,
        "eval_samples",
        "0 with eval_every > 0: nothing to evaluate (set eval_every = 0 to turn evaluation off)",
    );
    }

    /// The settings of `self` that differ from `earlier` (a checkpoint's), as `key: old -> new`.
    pub fn changes_from(&self, earlier: &TrainConfig) -> Vec<String> {
        let (now, then) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(earlier).unwrap_or_default(),
        );
        let (Some(now), Some(then)) = (now.as_object(), then.as_object()) else {
            return vec![];
        };
        now.iter()
            .filter(|(k, v)| then.get(*k) != Some(v))
            .map(|(k, v)| {
                let old = then.get(k).map_or("(unset)".to_string(), |o| o.to_string());
                format!("{k}: {old} -> {v}")
            })
            .collect()
    }

    /// Reads a config file with a profile and `KEY=VALUE` overrides (see
    /// `from_toml_with_overrides`).
    pub fn load_with_overrides(
        path: &Path,
        profile: Profile,
        overrides: &[String],
    ) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml_with_overrides(&text, &path.display().to_string(), profile, overrides)
    }

    /// The autocast dtype of the head's matrix products on `device`, if any.
    pub fn autocast_kind(&self, device: tch::Device) -> Option<tch::Kind> {
        let on = if device.is_cuda() {
            self.bf16_on_cuda
        } else {
            self.bf16_on_cpu
        };
        on.then_some(tch::Kind::BFloat16)
    }

    /// How training samples are grouped into steps.
    pub fn batching(&self) -> Batching {
        match (self.conversations_per_step, self.micro_batch_tokens) {
            (Some(per_step), Some(micro_batch_tokens)) => Batching::Conversations {
                per_step,
                micro_batch_tokens,
            },
            _ => Batching::Tokens {
                batch_tokens: self.batch_tokens,
                window: self.bucket_window,
            },
        }
    }

    /// The most padded tokens one forward pass holds: the micro-batch or the token batch.
    pub fn tokens_per_pass(&self) -> usize {
        self.micro_batch_tokens.unwrap_or(self.batch_tokens)
    }

    /// The loss of a run of `head`: the head's reference weights with this config's
    /// distillation term and depth weights.
    pub fn loss_weights(&self, head: &HeadConfig) -> LossWeights {
        let mut w = LossWeights::reference(head);
        w.distill = self
            .distill_loss
            .build(self.lk_eta.unwrap_or(DEFAULT_LK_ETA));
        w.depth_gamma = match self.depth_weighting {
            DepthWeighting::Decay => None,
            DepthWeighting::Exp => self.depth_gamma,
        };
        w
    }

    pub fn head_config(&self, teacher: &Teacher) -> HeadConfig {
        let mut h = HeadConfig::from_teacher(&teacher.config);
        h.options = self.head.clone();
        crate::model::kinds::arch_of(h.options.head)
            .training_defaults(&mut h.options, &teacher.config);
        h
    }
}

/// Test hooks (not reachable from the CLI).
#[derive(Debug, Default, Clone)]
pub struct TrainOptions {
    /// Stop (as if killed) after this global step, right after its checkpoint would be written.
    pub halt_after_step: Option<u64>,
    /// Fault injection: make the loss of this step NaN.
    pub inject_nan_at_step: Option<u64>,
}

/// One `KEY=VALUE` override: VALUE as TOML, else as a plain string.
fn parse_override(item: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = item
        .split_once('=')
        .with_context(|| format!("--set {item:?}: expected KEY=VALUE"))?;
    let key = key.trim().to_string();
    anyhow::ensure!(!key.is_empty(), "--set {item:?}: empty key");
    let parsed: Option<toml::Table> = toml::from_str(&format!("v = {}", raw.trim())).ok();
    let value = parsed
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    Ok((key, value))
}
