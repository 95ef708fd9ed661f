//! The report of `clover eval`: per-turn records pooled into tau, acceptance and speed, per
//! category and per tree setting, and the table printed on the terminal. `clover report` reads
//! the same type back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::decode::eval::AutoChoice;

/// Measurements of one turn.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TurnRecord {
    pub question_id: String,
    pub category: String,
    pub turn: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    pub baseline_new_tokens: usize,
    pub baseline_seconds: f64,
    /// Accepted drafts per verification step.
    pub accepted: Vec<usize>,
    /// At T = 0: speculative ids differ from plain ids.
    pub mismatch: bool,
    /// Host-side split of the speculative steps (exact on the CPU; on CUDA, kernels run
    /// asynchronously, so time drifts into the verify part, which ends with a device sync).
    pub draft_seconds: f64,
    pub verify_seconds: f64,
    /// The speculative prefill (in `seconds`, in no per-step figure).
    pub prefill_seconds: f64,
}

impl TurnRecord {
    fn committed(&self) -> usize {
        self.accepted.iter().map(|a| a + 1).sum()
    }
}

/// Pooled figures for a set of turns.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Pooled {
    pub turns: usize,
    pub steps: usize,
    pub tau: f64,
    pub tau_reference_variant: f64,
    pub new_tokens: usize,
    pub tokens_per_s: f64,
    pub baseline_tokens_per_s: f64,
    pub speedup: f64,
}

pub(super) fn pool<'a>(records: impl Iterator<Item = &'a TurnRecord>) -> Pooled {
    let (mut turns, mut steps, mut ref_steps, mut committed) = (0, 0, 0, 0);
    let (mut tokens, mut secs, mut base_tokens, mut base_secs) = (0, 0.0, 0, 0.0);
    for r in records {
        turns += 1;
        steps += r.accepted.len();
        ref_steps += r.accepted.len().saturating_sub(1);
        committed += r.committed();
        tokens += r.new_tokens;
        secs += r.seconds;
        base_tokens += r.baseline_new_tokens;
        base_secs += r.baseline_seconds;
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let tokens_per_s = ratio(tokens as f64, secs);
    let baseline_tokens_per_s = ratio(base_tokens as f64, base_secs);
    Pooled {
        turns,
        steps,
        tau: ratio(committed as f64, steps as f64),
        tau_reference_variant: ratio(committed as f64, ref_steps as f64),
        new_tokens: tokens,
        tokens_per_s,
        baseline_tokens_per_s,
        speedup: ratio(tokens_per_s, baseline_tokens_per_s),
    }
}

/// The JSON report of `clover eval`, written by `eval` and read back by `clover report`. The
/// fields a report always had are required; those added since default, so older reports read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub tau: f64,
    #[serde(default)]
    pub tau_reference_variant: f64,
    pub tau_per_category: BTreeMap<String, f64>,
    pub acceptance_per_depth: Vec<f64>,
    #[serde(default)]
    pub tokens_per_s: f64,
    #[serde(default)]
    pub baseline_tokens_per_s: f64,
    pub speedup: f64,
    #[serde(default)]
    pub tree_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    pub device: String,
    #[serde(default)]
    pub dtype: String,
    #[serde(default)]
    pub n_prompts: usize,
    #[serde(default)]
    pub n_turns: usize,
    #[serde(default)]
    pub new_tokens: usize,
    #[serde(default)]
    pub baseline_new_tokens: usize,
    #[serde(default)]
    pub verification_steps: usize,
    #[serde(default)]
    pub lossless_mismatches: usize,
    #[serde(default)]
    pub max_new_tokens: usize,
    #[serde(default, deserialize_with = "null_as_default")]
    pub head: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub head_parameters: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub draft_dir: String,
    /// Σ draft / Σ verify seconds of the speculative steps (see `TurnRecord`).
    #[serde(default)]
    pub draft_seconds: f64,
    #[serde(default)]
    pub verify_seconds: f64,
    #[serde(default)]
    pub draft_ms_per_step: f64,
    #[serde(default)]
    pub verify_ms_per_step: f64,
    #[serde(default)]
    pub other_ms_per_step: f64,
    /// Size of the draft vocabulary (None = the teacher's whole vocabulary).
    #[serde(default)]
    pub draft_vocab: Option<usize>,
    /// Every tree setting evaluated, the first one being the top-level figures.
    #[serde(default)]
    pub trees: Vec<TreeRow>,
    /// What `--tree auto` chose and why.
    #[serde(default)]
    pub auto: Option<AutoChoice>,
    #[serde(default)]
    pub per_category: BTreeMap<String, Pooled>,
    #[serde(default)]
    pub turns: Vec<TurnRecord>,
}

/// How an evaluation ran: the settings a report states beside its figures.
#[derive(Debug, Clone, Default)]
pub struct EvalSettings {
    /// Depth of the tree (acceptance is reported per depth up to it).
    pub max_depth: usize,
    pub tree_tokens: usize,
    pub temperature: f64,
    pub device: String,
    pub dtype: String,
    pub n_prompts: usize,
    pub max_new_tokens: usize,
    /// The draft head: its kind ("clover2", "eagle1", "medusa"), trainable parameters and
    /// exported directory (`clover report` finds the training run's logs from it).
    pub head: String,
    pub head_parameters: i64,
    pub draft_dir: String,
}

/// The whole report, built here from the per-turn records and the settings.
pub fn summarize(records: &[TurnRecord], settings: &EvalSettings) -> EvalReport {
    let max_depth = settings.max_depth;
    let all = pool(records.iter());
    let per_step = |secs: f64| {
        if all.steps > 0 {
            1000.0 * secs / all.steps as f64
        } else {
            0.0
        }
    };
    let mut per_category = BTreeMap::new();
    for cat in records.iter().map(|r| r.category.clone()) {
        if !per_category.contains_key(&cat) {
            let pooled = pool(records.iter().filter(|r| r.category == cat));
            per_category.insert(cat, pooled);
        }
    }
    let acceptance_per_depth = (1..=max_depth)
        .map(|d| {
            let hits: usize = records
                .iter()
                .map(|r| r.accepted.iter().filter(|&&a| a >= d).count())
                .sum();
            if all.steps > 0 {
                hits as f64 / all.steps as f64
            } else {
                0.0
            }
        })
        .collect();
    EvalReport {
        tau: all.tau,
        tau_reference_variant: all.tau_reference_variant,
        tau_per_category: per_category
            .iter()
            .map(|(k, v)| (k.clone(), v.tau))
            .collect(),
        acceptance_per_depth,
        tokens_per_s: all.tokens_per_s,
        baseline_tokens_per_s: all.baseline_tokens_per_s,
        speedup: all.speedup,
        tree_tokens: settings.tree_tokens,
        temperature: settings.temperature,
        device: settings.device.clone(),
        dtype: settings.dtype.clone(),
        n_prompts: settings.n_prompts,
        n_turns: records.len(),
        new_tokens: all.new_tokens,
        baseline_new_tokens: records.iter().map(|r| r.baseline_new_tokens).sum(),
        verification_steps: all.steps,
        lossless_mismatches: records.iter().filter(|r| r.mismatch).count(),
        max_new_tokens: settings.max_new_tokens,
        head: settings.head.clone(),
        head_parameters: settings.head_parameters,
        draft_dir: settings.draft_dir.clone(),
        draft_seconds: records.iter().map(|r| r.draft_seconds).sum(),
        verify_seconds: records.iter().map(|r| r.verify_seconds).sum(),
        draft_ms_per_step: per_step(records.iter().map(|r| r.draft_seconds).sum()),
        verify_ms_per_step: per_step(records.iter().map(|r| r.verify_seconds).sum()),
        other_ms_per_step: per_step(
            records
                .iter()
                .map(|r| r.seconds - r.prefill_seconds - r.draft_seconds - r.verify_seconds)
                .sum(),
        ),
        draft_vocab: None,
        trees: Vec::new(),
        auto: None,
        per_category,
        turns: records.to_vec(),
    }
}

/// One tree setting's figures in the report's `trees` list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeRow {
    /// The setting as asked for: "default", "auto", "dynamic" or a tree file.
    pub tree: String,
    /// Tokens verified per step (root included; 1 = plain decoding).
    #[serde(default)]
    pub tree_tokens: usize,
    pub tau: f64,
    #[serde(default)]
    pub tau_per_category: BTreeMap<String, f64>,
    pub acceptance_per_depth: Vec<f64>,
    #[serde(default)]
    pub draft_ms_per_step: f64,
    #[serde(default)]
    pub verify_ms_per_step: f64,
    #[serde(default)]
    pub other_ms_per_step: f64,
    #[serde(default)]
    pub tokens_per_s: f64,
    pub speedup: f64,
    #[serde(default)]
    pub lossless_mismatches: usize,
}

impl TreeRow {
    pub(super) fn new(tree: &str, r: &EvalReport) -> Self {
        Self {
            tree: tree.to_string(),
            tree_tokens: r.tree_tokens,
            tau: r.tau,
            tau_per_category: r.tau_per_category.clone(),
            acceptance_per_depth: r.acceptance_per_depth.clone(),
            draft_ms_per_step: r.draft_ms_per_step,
            verify_ms_per_step: r.verify_ms_per_step,
            other_ms_per_step: r.other_ms_per_step,
            tokens_per_s: r.tokens_per_s,
            speedup: r.speedup,
            lossless_mismatches: r.lossless_mismatches,
        }
    }
}

pub(super) fn print_table(r: &EvalReport) {
    println!(
        "{:<16} {:>6} {:>7} {:>10} {:>11} {:>8}",
        "category", "turns", "tau", "tok/s", "base tok/s", "speedup"
    );
    let row = |name: &str, p: &Pooled| {
        println!(
            "{:<16} {:>6} {:>7.3} {:>10.1} {:>11.1} {:>7.2}x",
            name, p.turns, p.tau, p.tokens_per_s, p.baseline_tokens_per_s, p.speedup
        );
    };
    for (cat, p) in &r.per_category {
        row(cat, p);
    }
    let all = pool(r.turns.iter());
    row("all", &all);
    let depths: Vec<String> = r
        .acceptance_per_depth
        .iter()
        .map(|a| format!("{a:.3}"))
        .collect();
    println!(
        "tau {:.3} (reference variant {:.3}), acceptance per depth [{}], tree {} tokens, T = {}, \
         {} {}, {} prompts, {} new tokens, lossless mismatches {}, draft {:.2}s / verify {:.2}s",
        r.tau,
        r.tau_reference_variant,
        depths.join(", "),
        r.tree_tokens,
        r.temperature,
        r.device,
        r.dtype,
        r.n_prompts,
        r.new_tokens,
        r.lossless_mismatches,
        r.draft_seconds,
        r.verify_seconds
    );
    println!(
        "{:<24} {:>6} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "tree",
        "tokens",
        "tau",
        "draft ms",
        "verify ms",
        "other ms",
        "tok/s",
        "speedup",
        "mismatches"
    );
    for t in &r.trees {
        println!(
            "{:<24} {:>6} {:>7.3} {:>9.2} {:>9.2} {:>9.2} {:>8.1} {:>7.2}x {:>10}",
            t.tree,
            t.tree_tokens,
            t.tau,
            t.draft_ms_per_step,
            t.verify_ms_per_step,
            t.other_ms_per_step,
            t.tokens_per_s,
            t.speedup,
            t.lossless_mismatches
        );
    }
    println!("plain decoding: {:.1} tokens/s", r.baseline_tokens_per_s);
}

/// A field older reports wrote as null (or left out): read as its default.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}
