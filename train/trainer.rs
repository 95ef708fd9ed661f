//! `clover train`: distil a Clover-2 draft head from a frozen teacher (spec §2).
//!
//! Online mode runs the teacher under no_grad inside the loop; offline mode reads its pre-norm
//! states from a `targets::DistillCache`. Batches are bucketed by length. Checkpoints hold the
//! head, the AdamW moments, the step, the RNG seed and the data position, so `--resume` replays
//! the uninterrupted run exactly.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::{read_split, Sample, Split};
use crate::head::{read_head_tensors, write_tensors, DraftHead, HeadConfig};
use crate::loss::{clover_loss, shift_for_training, teacher_targets, DepthLoss, LossWeights};
use crate::targets::DistillCache;
use crate::teacher::{parse_device, Teacher};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML training config (see configs/*.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the newest checkpoint in the config's out dir.
    #[arg(long)]
    pub resume: bool,
    /// Which overrides apply: `cuda` applies the config's [cuda] table, `cpu` ignores it, `auto`
    /// applies it when the run lands on a CUDA device.
    #[arg(long, default_value = "auto")]
    pub profile: String,
}

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
fn d_depths() -> i64 {
    5
}
fn d_layers() -> i64 {
    2
}
fn d_decay() -> f64 {
    0.7
}
fn d_one() -> f64 {
    1.0
}
fn d_theta() -> f64 {
    crate::head::REFERENCE_DRAFT_ROPE_THETA
}
fn d_eval_samples() -> usize {
    64
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
    // --- head (the reference's ConfigClover; see head::HeadConfig) ---
    #[serde(default = "d_depths")]
    pub num_depths: i64,
    #[serde(default = "d_layers")]
    pub num_layers: i64,
    #[serde(default = "d_decay")]
    pub decay: f64,
    #[serde(default = "d_one")]
    pub heads_coefficient: f64,
    /// G2: 10000 as the reference, whatever the teacher's rope_theta.
    #[serde(default = "d_theta")]
    pub draft_rope_theta: f64,
    /// G1: base layer 0, as the reference actually does.
    #[serde(default)]
    pub init_from_layer: i64,
    // --- length of training ---
    /// Passes over the train split (the reference runs 21, G14). Used when max_steps is absent.
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Optimizer steps; overrides epochs.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Padded tokens per batch (rows × longest row).
    #[serde(default = "d_batch_tokens")]
    pub batch_tokens: usize,
    /// Samples are truncated to this many tokens (reference 2048).
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// Use at most this many train samples (None = all).
    #[serde(default)]
    pub max_train_samples: Option<usize>,
    /// Samples per shuffled window that is sorted by length before cutting batches.
    #[serde(default = "d_window")]
    pub bucket_window: usize,
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
    #[serde(default)]
    pub seed: u64,
    /// bf16 compute with f32 master weights on CUDA (the reference's accelerate bf16). CPU is f32.
    #[serde(default = "d_true")]
    pub bf16_on_cuda: bool,
    /// Progress bar on stderr.
    #[serde(default = "d_true")]
    pub progress: bool,
}

impl TrainConfig {
    /// Parses TOML, applying the `[cuda]` table when `device` resolves to CUDA.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        Self::from_toml_with_profile(text, origin, "auto")
    }

    /// As `from_toml`; `profile` = cuda | cpu | auto says whether the `[cuda]` table applies.
    pub fn from_toml_with_profile(text: &str, origin: &str, profile: &str) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).with_context(|| format!("parsing {origin}"))?;
        let cuda = table.remove("cuda");
        let device = table
            .get("device")
            .and_then(|v| v.as_str())
            .unwrap_or("auto")
            .to_string();
        let use_cuda_table = match profile {
            "cuda" => true,
            "cpu" => false,
            "auto" => parse_device(&device)?.is_cuda(),
            other => bail!("unknown --profile {other:?} (use auto, cpu or cuda)"),
        };
        if use_cuda_table {
            if let Some(toml::Value::Table(over)) = cuda {
                for (k, v) in over {
                    table.insert(k, v);
                }
            }
        }
        toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("{origin}: invalid training config"))
    }

    pub fn load(path: &Path, profile: &str) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml_with_profile(&text, &path.display().to_string(), profile)
    }

    pub fn head_config(&self, teacher: &Teacher) -> HeadConfig {
        let mut h = HeadConfig::from_teacher(&teacher.config);
        h.num_depths = self.num_depths;
        h.num_layers = self.num_layers;
        h.decay = self.decay;
        h.heads_coefficient = self.heads_coefficient;
        h.draft_rope_theta = self.draft_rope_theta;
        h.init_from_layer = self.init_from_layer;
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

/// What a run did, step by step (also appended to `<out>/metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub depth_loss: Vec<f64>,
    pub depth_top1: Vec<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    pub loss: f64,
    /// Teacher-forced per-depth top-1 (as in training).
    pub forced_top1: Vec<f64>,
    /// Chained draft: depth k fed its own argmax; fraction of starts with depths 0..=k all right.
    pub chained_top1: Vec<f64>,
    pub starts: usize,
    /// Accuracy of always predicting the most frequent teacher token on these targets.
    pub unigram_top1: f64,
}

#[derive(Debug, Default)]
pub struct TrainOutcome {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub last_checkpoint: Option<PathBuf>,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let cfg = TrainConfig::load(&args.config, &args.profile)?;
    let device = parse_device(&cfg.device)?;
    let teacher_kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let teacher = Teacher::load(&cfg.model_dir, device, teacher_kind)?;
    let source = match &cfg.distill_cache {
        Some(dir) => Source::Offline(DistillCache::open(dir)?),
        None => Source::Online(read_split(&cfg.data_dir, Split::Train)?),
    };
    let eval = read_split(&cfg.data_dir, Split::Eval)?;
    let outcome = train(
        &cfg,
        &teacher,
        source,
        eval,
        args.resume,
        &TrainOptions::default(),
    )?;
    if let Some(last) = outcome.evals.last() {
        eprintln!(
            "final eval: loss {:.4}, chained top-1 per depth {:?} (unigram baseline {:.3})",
            last.loss, last.chained_top1, last.unigram_top1
        );
    }
    if let Some(ck) = outcome.last_checkpoint {
        eprintln!("last checkpoint: {}", ck.display());
    }
    Ok(())
}

/// Where the teacher states come from.
pub enum Source {
    /// Run the frozen teacher in the loop.
    Online(Vec<Sample>),
    /// Read its pre-norm states from a distillation cache (train split, same order).
    Offline(DistillCache),
}

impl Source {
    fn samples(&self) -> &[Sample] {
        match self {
            Source::Online(s) => s,
            Source::Offline(c) => c.samples(),
        }
    }
}

/// Per-run state saved in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    /// Optimizer steps done.
    step: u64,
    /// Data position: epoch and batch index within it of the next batch.
    epoch: u64,
    batch_in_epoch: usize,
    /// The data RNG is a pure function of (seed, epoch), so this is its whole state.
    seed: u64,
    adam_step: i64,
    head: HeadConfig,
    config: TrainConfig,
}

/// SplitMix64: a tiny deterministic RNG for data order, reproducible from (seed, epoch).
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Length-bucketed batches of one epoch: shuffle, sort by length within windows of `window`
/// samples, cut batches of at most `batch_tokens` padded tokens, shuffle the batch order.
pub fn epoch_batches(
    lengths: &[usize],
    batch_tokens: usize,
    window: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let mut batches = Vec::new();
    for chunk in order.chunks(window.max(1)) {
        let mut sorted = chunk.to_vec();
        sorted.sort_by_key(|&i| lengths[i]);
        let mut current: Vec<usize> = Vec::new();
        for i in sorted {
            let longest = current
                .iter()
                .map(|&j| lengths[j])
                .max()
                .unwrap_or(0)
                .max(lengths[i]);
            if !current.is_empty() && longest * (current.len() + 1) > batch_tokens {
                batches.push(std::mem::take(&mut current));
            }
            current.push(i);
        }
        if !current.is_empty() {
            batches.push(current);
        }
    }
    rng.shuffle(&mut batches);
    batches
}

/// A padded batch on the device: the head's inputs and the shifted mask.
pub struct Batch {
    /// Teacher pre-norm states [B,T,H].
    pub u: Tensor,
    /// x_{t+1} at position t [B,T] (G4).
    pub next_ids: Tensor,
    /// Shifted 0/1 loss mask [B,T] f32 (last real position and padding are 0).
    pub mask: Tensor,
    /// Real (unpadded) tokens.
    pub tokens: usize,
    /// Input ids [B,T] (padding 0), for the chained eval.
    pub ids: Tensor,
}

fn truncated(s: &Sample, max_len: usize) -> (&[i64], &[u8]) {
    let n = s.input_ids.len().min(max_len);
    (&s.input_ids[..n], &s.loss_mask[..s.loss_mask.len().min(n)])
}

/// Right-pads samples into tensors; `states` (offline) are their cached [T,H] teacher states,
/// otherwise the teacher runs under no_grad.
pub fn make_batch(
    teacher: &Teacher,
    samples: &[&Sample],
    states: Option<Vec<Tensor>>,
    max_len: usize,
) -> Result<Batch> {
    let device = teacher.device();
    ensure!(!samples.is_empty(), "empty batch");
    let width = samples
        .iter()
        .map(|s| truncated(s, max_len).0.len())
        .max()
        .unwrap_or(0);
    ensure!(width >= 2, "samples need at least 2 tokens");
    let b = samples.len();
    let (mut ids, mut next, mut mask) = (
        vec![0i64; b * width],
        vec![0i64; b * width],
        vec![0f32; b * width],
    );
    let mut tokens = 0;
    for (r, s) in samples.iter().enumerate() {
        let (sid, smask) = truncated(s, max_len);
        let (n_ids, n_mask) = shift_for_training(sid, smask);
        let o = r * width;
        ids[o..o + sid.len()].copy_from_slice(sid);
        next[o..o + sid.len()].copy_from_slice(&n_ids);
        mask[o..o + sid.len()].copy_from_slice(&n_mask);
        tokens += sid.len();
    }
    let shape = [b as i64, width as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let u = match states {
        Some(states) => {
            let h = teacher.config.hidden_size;
            let rows: Vec<Tensor> = states
                .iter()
                .map(|st| {
                    let n = st.size()[0].min(width as i64);
                    let st = st.narrow(0, 0, n).to_kind(teacher.kind());
                    st.constant_pad_nd([0, 0, 0, width as i64 - n])
                })
                .collect();
            let u = Tensor::stack(&rows, 0).to_device(device);
            ensure!(
                u.size() == [b as i64, width as i64, h],
                "cached states have shape {:?}",
                u.size()
            );
            u
        }
        None => {
            let positions = Tensor::arange(width as i64, (Kind::Int64, device))
                .unsqueeze(0)
                .expand(shape, true);
            // Right padding is harmless under causal attention: real rows never see it.
            tch::no_grad(|| teacher.forward(&ids, &positions, None, None))
        }
    };
    Ok(Batch {
        u,
        next_ids: Tensor::from_slice(&next).view(shape).to_device(device),
        mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        tokens,
        ids,
    })
}

/// AdamW with saveable state. tch's `nn::Optimizer` keeps its moments inside libtorch with no
/// API to read or write them, so an exact `--resume` needs our own: this is torch.optim.AdamW's
/// update (decoupled decay p ← p·(1−lr·wd), bias-corrected moments, eps outside the sqrt).
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: i64,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(
        params: &BTreeMap<String, Tensor>,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    ) -> Self {
        let zeros = |p: &Tensor| Tensor::zeros_like(p);
        AdamW {
            beta1: betas.0,
            beta2: betas.1,
            eps,
            weight_decay,
            step: 0,
            m: params.iter().map(|(n, p)| (n.clone(), zeros(p))).collect(),
            v: params.iter().map(|(n, p)| (n.clone(), zeros(p))).collect(),
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn update(&mut self, params: &BTreeMap<String, Tensor>, lr: f64) {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for (name, p) in params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                let m = self.m.get_mut(name).expect("moment for every parameter");
                let _ = m.g_mul_scalar_(self.beta1);
                let _ = m.g_add_(&(&g * (1.0 - self.beta1)));
                let v = self.v.get_mut(name).expect("moment for every parameter");
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.g_add_(&(&g * &g * (1.0 - self.beta2)));
                let denom = v.sqrt() / bc2.sqrt() + self.eps;
                let _ = p.g_sub_(&(&*m / denom * (lr / bc1)));
            }
        });
    }

    fn save(&self, file: &Path) -> Result<()> {
        let mut all = BTreeMap::new();
        for (n, t) in &self.m {
            all.insert(format!("m.{n}"), t.shallow_clone());
        }
        for (n, t) in &self.v {
            all.insert(format!("v.{n}"), t.shallow_clone());
        }
        write_tensors(file, &all)
    }

    fn load(&mut self, file: &Path, step: i64) -> Result<()> {
        let all: BTreeMap<String, Tensor> = Tensor::read_safetensors(file)
            .with_context(|| format!("reading {}", file.display()))?
            .into_iter()
            .collect();
        for (prefix, map) in [("m", &mut self.m), ("v", &mut self.v)] {
            for (n, t) in map.iter_mut() {
                let src = all
                    .get(&format!("{prefix}.{n}"))
                    .with_context(|| format!("{}: no {prefix}.{n}", file.display()))?;
                ensure!(
                    src.size() == t.size(),
                    "{}: {prefix}.{n} has shape {:?}",
                    file.display(),
                    src.size()
                );
                *t = src.to_device(t.device()).to_kind(t.kind());
            }
        }
        self.step = step;
        Ok(())
    }
}

/// get_linear_schedule_with_warmup's factor at optimizer step `step` (0-based: the first step
/// uses lambda(0), which is 0 when there is a warm-up, as in HF).
pub fn lr_factor(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let rest = total.saturating_sub(warmup).max(1);
    (total.saturating_sub(step) as f64 / rest as f64).max(0.0)
}

/// L2 norm of all gradients (logged before clipping).
fn grad_norm(params: &BTreeMap<String, Tensor>) -> f64 {
    let mut sq = 0.0;
    for p in params.values() {
        let g = p.grad();
        if g.defined() {
            sq += g
                .to_kind(Kind::Double)
                .pow_tensor_scalar(2)
                .sum(Kind::Double)
                .double_value(&[]);
        }
    }
    sq.sqrt()
}

fn zero_grads(params: &BTreeMap<String, Tensor>) {
    for p in params.values() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// clip_grad_value_: clamp every gradient element to [-clip, clip].
fn clip_grads_by_value(params: &BTreeMap<String, Tensor>, clip: f64) {
    for p in params.values() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.clamp_(-clip, clip);
        }
    }
}

fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Checkpoints in `out`, oldest first.
pub fn list_checkpoints(out: &Path) -> Result<Vec<PathBuf>> {
    let dir = checkpoints_dir(out);
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Files of a checkpoint dir.
pub const CK_HEAD: &str = "head.safetensors";
pub const CK_OPTIM: &str = "optim.safetensors";
pub const CK_STATE: &str = "state.json";
/// The teacher's config.json, kept so `export` needs nothing else.
pub const CK_TEACHER_CONFIG: &str = "teacher_config.json";

/// Writes a checkpoint into a temp dir and renames it into place (readers never see half of one),
/// then deletes all but the newest `keep` checkpoints.
fn save_checkpoint(
    out: &Path,
    head: &DraftHead,
    opt: &AdamW,
    state: &CheckpointState,
    teacher: &Teacher,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = checkpoint_name(state.step);
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_tensors(&tmp.join(CK_HEAD), &head.named_tensors())?;
    opt.save(&tmp.join(CK_OPTIM))?;
    std::fs::write(tmp.join(CK_STATE), serde_json::to_string_pretty(state)?)
        .with_context(|| format!("writing {}", tmp.join(CK_STATE).display()))?;
    let teacher_cfg = teacher.dir.join("config.json");
    std::fs::copy(&teacher_cfg, tmp.join(CK_TEACHER_CONFIG))
        .with_context(|| format!("copying {}", teacher_cfg.display()))?;
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    let all = list_checkpoints(out)?;
    for old in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(old)
            .with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(final_dir)
}

fn load_state(ck: &Path) -> Result<CheckpointState> {
    let f = ck.join(CK_STATE);
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))
}

/// A checkpoint dir from what a user may name: the dir itself, a training out dir (its newest
/// checkpoint), or `<out>/latest`.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(CK_STATE).exists() {
        return Ok(path.to_path_buf());
    }
    let named_latest = path.file_name().is_some_and(|n| n == "latest");
    let out = if named_latest {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    list_checkpoints(out)?.pop().with_context(|| {
        format!(
            "{}: not a checkpoint, and no checkpoints under {}",
            path.display(),
            checkpoints_dir(out).display()
        )
    })
}

/// The head config and tensors of a checkpoint dir (used by `export`).
pub fn read_checkpoint_head(ck: &Path) -> Result<(HeadConfig, BTreeMap<String, Tensor>)> {
    let state = load_state(ck)?;
    let tensors = read_head_tensors(&ck.join(CK_HEAD), &state.head)?;
    Ok((state.head, tensors))
}

fn append_jsonl<T: Serialize>(file: &Path, rec: &T) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    writeln!(f, "{}", serde_json::to_string(rec)?)
        .with_context(|| format!("writing {}", file.display()))
}

fn states_for(source: &Source, batch: &[usize]) -> Result<Option<Vec<Tensor>>> {
    match source {
        Source::Online(_) => Ok(None),
        Source::Offline(cache) => batch
            .iter()
            .map(|&i| cache.get(i).map(|x| x.1))
            .collect::<Result<Vec<_>>>()
            .map(Some),
    }
}

/// The training loop. `eval` is the held-out split (the teacher runs on it online).
pub fn train(
    cfg: &TrainConfig,
    teacher: &Teacher,
    source: Source,
    eval: Vec<Sample>,
    resume: bool,
    opts: &TrainOptions,
) -> Result<TrainOutcome> {
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("creating {}", cfg.out_dir.display()))?;
    let device = teacher.device();
    let n_train = source
        .samples()
        .len()
        .min(cfg.max_train_samples.unwrap_or(usize::MAX));
    ensure!(n_train > 0, "no training samples");
    let lengths: Vec<usize> = source.samples()[..n_train]
        .iter()
        .map(|s| s.input_ids.len().min(cfg.max_len))
        .collect();
    let batches_per_epoch =
        epoch_batches(&lengths, cfg.batch_tokens, cfg.bucket_window, cfg.seed, 0).len();
    let total_steps = match (cfg.max_steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * batches_per_epoch as u64,
        (None, None) => bail!("set max_steps or epochs in the training config"),
    };
    let schedule_steps = cfg.schedule_steps.unwrap_or(total_steps);

    let head_cfg = cfg.head_config(teacher);
    let mut head = match &cfg.init_from {
        Some(dir) => {
            DraftHead::load(dir, teacher).with_context(|| format!("init_from {}", dir.display()))?
        }
        None => DraftHead::new(teacher, head_cfg.clone(), cfg.seed as i64)?,
    };
    if device.is_cuda() && cfg.bf16_on_cuda {
        head.set_compute_kind(Kind::BFloat16);
    }
    let params = head.named_tensors();
    let mut opt = AdamW::new(&params, cfg.betas, cfg.adam_eps, cfg.weight_decay);
    let (mut step, mut epoch, mut batch_in_epoch) = (0u64, 0u64, 0usize);
    let mut outcome = TrainOutcome::default();
    if resume {
        let last = list_checkpoints(&cfg.out_dir)?.pop().with_context(|| {
            format!(
                "--resume: no checkpoint under {}",
                checkpoints_dir(&cfg.out_dir).display()
            )
        })?;
        let state = load_state(&last)?;
        ensure!(
            state.head == *head.config(),
            "{}: head config differs from the training config",
            last.display()
        );
        let tensors = read_head_tensors(&last.join(CK_HEAD), &state.head)?;
        head.load_tensors(&tensors)?;
        opt.load(&last.join(CK_OPTIM), state.adam_step)?;
        (step, epoch, batch_in_epoch) = (state.step, state.epoch, state.batch_in_epoch);
        outcome.last_checkpoint = Some(last.clone());
        eprintln!("resuming from {} (step {step})", last.display());
    }
    let weights = LossWeights::reference(head.config());
    let mut tb =
        tensorboard_rs::summary_writer::SummaryWriter::new(cfg.out_dir.join("tensorboard"));
    let metrics = cfg.out_dir.join("metrics.jsonl");
    let bar = if cfg.progress {
        ProgressBar::new(total_steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(step);
    let lm_head = |o: &Tensor| head.logits(o);
    if step == 0 && cfg.eval_every > 0 && !eval.is_empty() {
        // The untrained head's figures, the baseline the eval curve starts from.
        let ev = evaluate(
            &head,
            teacher,
            &eval[..eval.len().min(cfg.eval_samples)],
            cfg,
            0,
        )?;
        log_eval(&mut tb, &ev);
        append_jsonl(&cfg.out_dir.join("eval.jsonl"), &ev)?;
        outcome.evals.push(ev);
    }
    let mut batches = epoch_batches(
        &lengths,
        cfg.batch_tokens,
        cfg.bucket_window,
        cfg.seed,
        epoch,
    );

    while step < total_steps {
        if batch_in_epoch >= batches.len() {
            epoch += 1;
            batch_in_epoch = 0;
            batches = epoch_batches(
                &lengths,
                cfg.batch_tokens,
                cfg.bucket_window,
                cfg.seed,
                epoch,
            );
        }
        let started = Instant::now();
        let idx = &batches[batch_in_epoch];
        let samples: Vec<&Sample> = idx.iter().map(|&i| &source.samples()[i]).collect();
        let batch = make_batch(teacher, &samples, states_for(&source, idx)?, cfg.max_len)?;
        let targets = teacher_targets(teacher, &batch.u, &batch.mask);
        let outs = head.depth_outputs(&batch.u, &batch.next_ids, None);
        let mut parts = clover_loss(&outs, &targets, &lm_head, &weights);
        if opts.inject_nan_at_step == Some(step + 1) {
            parts.depths[0].loss = f64::NAN;
            parts.total = parts.total * f64::NAN;
        }
        check_finite(step + 1, &parts.depths, outcome.last_checkpoint.as_deref())?;
        let lr = cfg.lr * lr_factor(step, cfg.warmup_steps, schedule_steps);
        zero_grads(&params);
        parts.total.backward();
        let gnorm = grad_norm(&params);
        clip_grads_by_value(&params, cfg.clip_value);
        opt.update(&params, lr);
        step += 1;
        batch_in_epoch += 1;
        let secs = started.elapsed().as_secs_f64();
        let rec = StepRecord {
            step,
            loss: parts.depths.iter().map(|d| d.loss).sum(),
            depth_loss: parts.depths.iter().map(|d| d.loss).collect(),
            depth_top1: parts.depths.iter().map(|d| d.top1).collect(),
            lr,
            grad_norm: gnorm,
            tokens: batch.tokens,
        };
        log_step(&mut tb, &rec, batch.tokens as f64 / secs.max(1e-9));
        append_jsonl(&metrics, &rec)?;
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s",
            rec.loss,
            batch.tokens as f64 / secs.max(1e-9)
        ));
        bar.set_position(step);
        outcome.steps.push(rec);

        if cfg.eval_every > 0
            && (step % cfg.eval_every == 0 || step == total_steps)
            && !eval.is_empty()
        {
            let ev = evaluate(
                &head,
                teacher,
                &eval[..eval.len().min(cfg.eval_samples)],
                cfg,
                step,
            )?;
            log_eval(&mut tb, &ev);
            append_jsonl(&cfg.out_dir.join("eval.jsonl"), &ev)?;
            bar.println(format!(
                "step {step}: eval loss {:.4}, chained top-1 {:?} (unigram {:.3})",
                ev.loss,
                ev.chained_top1
                    .iter()
                    .map(|a| format!("{a:.3}"))
                    .collect::<Vec<_>>(),
                ev.unigram_top1
            ));
            outcome.evals.push(ev);
        }
        if step % cfg.save_every.max(1) == 0 || step == total_steps {
            let state = CheckpointState {
                step,
                epoch,
                batch_in_epoch,
                seed: cfg.seed,
                adam_step: opt.step,
                head: head.config().clone(),
                config: cfg.clone(),
            };
            outcome.last_checkpoint = Some(save_checkpoint(
                &cfg.out_dir,
                &head,
                &opt,
                &state,
                teacher,
                cfg.keep_last,
            )?);
        }
        tb.flush();
        if opts.halt_after_step == Some(step) {
            break;
        }
    }
    bar.finish();
    Ok(outcome)
}

/// Stops training on a NaN/inf loss, naming the step and depth and the checkpoint that is kept.
fn check_finite(step: u64, depths: &[DepthLoss], last_good: Option<&Path>) -> Result<()> {
    for (i, d) in depths.iter().enumerate() {
        if !(d.loss.is_finite() && d.vloss.is_finite() && d.ploss.is_finite()) {
            let kept = last_good
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none yet".into());
            bail!(
                "non-finite loss at step {step}, depth {i} (loss {}, regression {}, distillation {}); \
                 training stopped without saving; last good checkpoint: {kept}",
                d.loss,
                d.vloss,
                d.ploss
            );
        }
    }
    Ok(())
}

fn log_step(tb: &mut tensorboard_rs::summary_writer::SummaryWriter, rec: &StepRecord, tok_s: f64) {
    let s = rec.step as usize;
    tb.add_scalar("train/loss", rec.loss as f32, s);
    for (i, (l, a)) in rec.depth_loss.iter().zip(&rec.depth_top1).enumerate() {
        tb.add_scalar(&format!("train/loss_depth{i}"), *l as f32, s);
        tb.add_scalar(&format!("train/top1_depth{i}"), *a as f32, s);
    }
    tb.add_scalar("train/lr", rec.lr as f32, s);
    tb.add_scalar("train/grad_norm", rec.grad_norm as f32, s);
    tb.add_scalar("train/tokens_per_s", tok_s as f32, s);
}

fn log_eval(tb: &mut tensorboard_rs::summary_writer::SummaryWriter, ev: &EvalRecord) {
    let s = ev.step as usize;
    tb.add_scalar("eval/loss", ev.loss as f32, s);
    for (i, a) in ev.chained_top1.iter().enumerate() {
        tb.add_scalar(&format!("eval/chained_top1_depth{i}"), *a as f32, s);
    }
    for (i, a) in ev.forced_top1.iter().enumerate() {
        tb.add_scalar(&format!("eval/forced_top1_depth{i}"), *a as f32, s);
    }
    tb.add_scalar("eval/unigram_top1", ev.unigram_top1 as f32, s);
}

/// Held-out loss (the training loss, token-weighted over batches) and the chained draft's
/// per-depth top-1 (as the reference's `getkacc_model`: depth k is fed the draft's own argmax;
/// accuracy at k = share of starts whose depths 0..=k all match the teacher's greedy tokens).
/// Starts are positions t whose root token x_{t+1} is the teacher's own greedy choice (getkacc
/// skips the others: at greedy inference the root always is) and whose next K targets are masked.
pub fn evaluate(
    head: &DraftHead,
    teacher: &Teacher,
    eval: &[Sample],
    cfg: &TrainConfig,
    step: u64,
) -> Result<EvalRecord> {
    tch::no_grad(|| {
        let k_depths = head.config().num_depths as usize;
        let weights = LossWeights::reference(head.config());
        let lm_head = |o: &Tensor| head.logits(o);
        let lengths: Vec<usize> = eval
            .iter()
            .map(|s| s.input_ids.len().min(cfg.max_len))
            .collect();
        let mut order: Vec<usize> = (0..eval.len()).collect();
        order.sort_by_key(|&i| lengths[i]);
        let (mut loss_sum, mut loss_weight) = (0.0, 0.0);
        let mut forced = vec![(0.0, 0i64); k_depths];
        let mut chained = vec![0i64; k_depths];
        let mut starts = 0usize;
        let mut unigram: BTreeMap<i64, i64> = BTreeMap::new();
        let batches = epoch_batches(&lengths, cfg.batch_tokens, eval.len().max(1), 0, 0);
        for idx in batches {
            let samples: Vec<&Sample> = idx.iter().map(|&i| &eval[i]).collect();
            let batch = make_batch(teacher, &samples, None, cfg.max_len)?;
            let targets = teacher_targets(teacher, &batch.u, &batch.mask);
            let outs = head.depth_outputs(&batch.u, &batch.next_ids, None);
            let parts = clover_loss(&outs, &targets, &lm_head, &weights);
            let n = parts.depths.first().map_or(0, |d| d.count) as f64;
            loss_sum += parts.depths.iter().map(|d| d.loss).sum::<f64>() * n;
            loss_weight += n;
            for (i, d) in parts.depths.iter().enumerate() {
                forced[i].0 += d.top1 * d.count as f64;
                forced[i].1 += d.count;
            }
            for t in Vec::<i64>::try_from(&targets.top1)? {
                *unigram.entry(t).or_default() += 1;
            }
            let (hits, n_starts) = chained_hits(head, teacher, &batch, k_depths)?;
            for (c, h) in chained.iter_mut().zip(hits) {
                *c += h;
            }
            starts += n_starts;
        }
        let total_targets: i64 = unigram.values().sum();
        let best = unigram.values().max().copied().unwrap_or(0);
        Ok(EvalRecord {
            step,
            loss: loss_sum / loss_weight.max(1.0),
            forced_top1: forced.iter().map(|(s, c)| s / (*c).max(1) as f64).collect(),
            chained_top1: chained
                .iter()
                .map(|&c| c as f64 / starts.max(1) as f64)
                .collect(),
            starts,
            unigram_top1: best as f64 / total_targets.max(1) as f64,
        })
    })
}

/// Chained-draft hits per depth for one batch, and the number of start positions.
fn chained_hits(
    head: &DraftHead,
    teacher: &Teacher,
    batch: &Batch,
    k_depths: usize,
) -> Result<(Vec<i64>, usize)> {
    let (b, t) = (batch.u.size()[0], batch.u.size()[1]);
    let k = k_depths as i64;
    // Teacher greedy token after every position: greedy[b,p] = argmax lm_head(h_p).
    let h_all = batch.u.reshape([b * t, -1]);
    let greedy: Vec<Tensor> = (0..b * t)
        .step_by(256)
        .map(|s| {
            teacher
                .logits(&h_all.narrow(0, s, (b * t - s).min(256)))
                .argmax(-1, false)
        })
        .collect();
    let greedy = Tensor::cat(&greedy, 0).view([b, t]);
    let mask: Vec<f32> = Vec::try_from(batch.mask.reshape([-1]).to_device(Device::Cpu))?;
    let ids: Vec<i64> = Vec::try_from(batch.ids.reshape([-1]).to_device(Device::Cpu))?;
    let greedy_v: Vec<i64> = Vec::try_from(greedy.reshape([-1]).to_device(Device::Cpu))?;
    let (bu, tu) = (b as usize, t as usize);
    let mut rows = Vec::new();
    for r in 0..bu {
        for p in 0..tu.saturating_sub(k_depths) {
            let o = r * tu + p;
            let targets_masked = (0..k_depths).all(|d| mask[o + d] > 0.5);
            if targets_masked && ids[o + 1] == greedy_v[o] {
                rows.push((r * tu + p) as i64);
            }
        }
    }
    if rows.is_empty() {
        return Ok((vec![0; k_depths], 0));
    }
    let rows_t = Tensor::from_slice(&rows).to_device(batch.u.device());
    let positions = Tensor::arange(t, (Kind::Int64, batch.u.device()))
        .unsqueeze(0)
        .expand([b, t], true);
    let (o0, s0) = head.depth0(&batch.u, &batch.next_ids, &positions, None, None);
    let hdim = o0.size()[2];
    let mut o = o0.reshape([-1, hdim]).index_select(0, &rows_t);
    let mut s = s0.reshape([-1, hdim]).index_select(0, &rows_t);
    let greedy_flat = greedy.reshape([-1]);
    let mut alive = Tensor::ones([rows.len() as i64], (Kind::Bool, batch.u.device()));
    let mut hits = Vec::with_capacity(k_depths);
    for d in 0..k {
        let y = head.logits(&o).argmax(-1, false);
        // Depth d at row p predicts x_{p+2+d}: the teacher's greedy token after position p+1+d.
        let want = greedy_flat.index_select(0, &(&rows_t + 1 + d));
        alive = alive.logical_and(&y.eq_tensor(&want));
        hits.push(alive.sum(Kind::Int64).int64_value(&[]));
        if d + 1 < k {
            let (on, sn) = head.step(&s, &y);
            o = on;
            s = sn;
        }
    }
    Ok((hits, rows.len()))
}

#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    /// Teacher model dir.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Timed optimizer steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Tokens per row (all trained: loss mask 1).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 5)]
    pub num_depths: i64,
}

/// Throughput of the full online training step (teacher forward, 5-depth head forward/backward,
/// AdamW) on random tokens, and the process's peak resident memory, as one JSON line.
pub fn run_bench(args: &BenchTrainArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let teacher = Teacher::load(&args.model, device, kind)?;
    let mut head_cfg = HeadConfig::from_teacher(&teacher.config);
    head_cfg.num_depths = args.num_depths;
    let mut head = DraftHead::new(&teacher, head_cfg, 0)?;
    if device.is_cuda() {
        head.set_compute_kind(Kind::BFloat16);
    }
    let params = head.named_tensors();
    let mut opt = AdamW::new(&params, (0.9, 0.95), 1e-8, 0.01);
    let weights = LossWeights::reference(head.config());
    let mut rng = SplitMix64::new(1);
    let vocab = teacher.config.vocab_size as u64;
    let samples: Vec<Sample> = (0..args.batch)
        .map(|i| Sample {
            id: format!("bench{i}"),
            input_ids: (0..args.seq_len)
                .map(|_| (rng.next_u64() % vocab) as i64)
                .collect(),
            loss_mask: vec![1; args.seq_len],
        })
        .collect();
    let refs: Vec<&Sample> = samples.iter().collect();
    let lm_head = |o: &Tensor| head.logits(o);
    let mut step = || -> Result<f64> {
        let batch = make_batch(&teacher, &refs, None, args.seq_len)?;
        let targets = teacher_targets(&teacher, &batch.u, &batch.mask);
        let outs = head.depth_outputs(&batch.u, &batch.next_ids, None);
        let parts = clover_loss(&outs, &targets, &lm_head, &weights);
        zero_grads(&params);
        parts.total.backward();
        clip_grads_by_value(&params, 0.5);
        opt.update(&params, 1e-3);
        Ok(parts.depths.iter().map(|d| d.loss).sum())
    };
    step()?;
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let started = Instant::now();
    let mut last = 0.0;
    for _ in 0..args.steps {
        last = step()?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens = (args.steps * args.batch * args.seq_len) as f64;
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "device": format!("{device:?}"),
        "threads": tch::get_num_threads(),
        "trainable_parameters": head.num_parameters(),
        "num_depths": args.num_depths,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "peak_rss_mib": peak_rss_mib(),
        "last_loss": last,
    });
    println!("{report}");
    Ok(())
}

/// VmHWM of this process from /proc (Linux); None elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
