//! `clover eval`: speculative against plain decoding on held-out prompts, for one or several
//! tree settings; `clover calibrate`: a head's acceptance table and this device's costs.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::data::shards::{read_split, Split};
use crate::decode::calibrate::{CalibrateOptions, CalibrationText};
use crate::decode::dynamic::DynamicTree;
use crate::decode::tree_search::SearchLimits;
use crate::decode::tree_spec::TreeSpec;
use crate::formats::chat::TemplateName;
use crate::outputs::{claim_file, refuse_overlap};

/// How the tree is chosen and sized, shared by `eval` and `calibrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct TreeArgs {
    /// Tree settings, comma-separated, evaluated on the same prompts (the first gives the
    /// top-level figures): default (mc_sim_7b_63), auto (searched from a calibration), dynamic
    /// (EAGLE-2), or a JSON file with a list of paths.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    pub tree: Vec<TreeSpec>,
    /// Calibration file for --tree auto (from `clover calibrate`); without it auto calibrates
    /// on the eval split of --data first.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Prepared data (`clover data prepare`): its eval split calibrates --tree auto, its train
    /// split's answer-token frequencies choose --draft-vocab.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// JSONL questions whose first turns, answered greedily by the teacher, calibrate --tree auto
    /// instead of --data's eval split: prompts like the evaluation's (the questions evaluated in
    /// this run are left out, so the same file may be given).
    #[arg(long)]
    pub calib_prompts: Option<PathBuf>,
    /// Calibrate on at most N of --calib-prompts (those not evaluated, in file order).
    #[arg(long, value_parser = crate::checks::positive)]
    pub calib_limit: Option<usize>,
    /// Draft only over the N most frequent answer tokens of --data's train split (FR-Spec
    /// slicing of the lm_head; no retraining, output unchanged).
    #[arg(long, value_parser = crate::checks::positive)]
    pub draft_vocab: Option<usize>,
    /// --tree auto: at most this many draft nodes (the root not counted).
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 32)]
    pub max_nodes: usize,
    /// --tree auto: at most this many draft depths.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 5)]
    pub max_depth: usize,
    /// --tree dynamic: tokens verified per step, the root included.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 26)]
    pub tree_tokens: usize,
    /// --tree dynamic: draft depths.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 5)]
    pub tree_depth: usize,
    /// --tree dynamic: children per node and nodes expanded per depth.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 10)]
    pub tree_topk: usize,
}

impl TreeArgs {
    fn dynamic(&self) -> DynamicTree {
        DynamicTree {
            tokens: self.tree_tokens,
            depth: self.tree_depth,
            top_k: self.tree_topk,
        }
    }

    fn search(&self) -> SearchLimits {
        SearchLimits {
            max_nodes: self.max_nodes,
            max_depth: self.max_depth,
        }
    }

    fn data_dir(&self, why: &str) -> Result<&Path> {
        self.data
            .as_deref()
            .with_context(|| format!("{why} needs --data DIR (prepared data)"))
    }

    /// The draft vocabulary's teacher ids, when asked for.
    fn draft_vocab_ids(&self, model: &Path) -> Result<Option<Vec<i64>>> {
        let Some(n) = self.draft_vocab else {
            return Ok(None);
        };
        Ok(Some(draft_vocab_ids(
            model,
            self.data_dir("--draft-vocab")?,
            n,
        )?))
    }
}

/// The `n` most frequent answer tokens of the prepared data's train split.
pub fn draft_vocab_ids(model: &Path, data: &Path, n: usize) -> Result<Vec<i64>> {
    let samples = read_split(data, Split::Train)?;
    let config = crate::model::config::LlamaConfig::from_file(&model.join("config.json"))?;
    crate::data::vocab::frequent_tokens(&samples, n, config.vocab_size as usize)
        .with_context(|| format!("draft vocabulary from {}", data.display()))
}

/// The eval split of prepared data as calibration texts (at most `limit`).
pub fn calibration_texts(dir: &Path, limit: Option<usize>) -> Result<Vec<CalibrationText>> {
    let mut samples = read_split(dir, Split::Eval)?;
    ensure!(
        !samples.is_empty(),
        "{}: the eval split is empty (prepare with --eval-fraction > 0)",
        dir.display()
    );
    if let Some(n) = limit {
        samples.truncate(n);
    }
    Ok(samples
        .into_iter()
        .map(|s| CalibrationText {
            input_ids: s.input_ids,
            loss_mask: s.loss_mask,
        })
        .collect())
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Teacher model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Exported draft head directory (model.safetensors + config.json).
    #[arg(long)]
    pub draft: PathBuf,
    /// JSONL questions: {"question_id", "category", "turns": [..]} (MT-bench / Spec-Bench).
    #[arg(long)]
    pub prompts: PathBuf,
    #[command(flatten)]
    pub trees: TreeArgs,
    /// 0 = greedy; > 0 = lossless tree speculative sampling.
    #[arg(long, allow_negative_numbers = true, value_parser = crate::checks::temperature, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Device and dtype; the head runs in the teacher's dtype.
    #[command(flatten)]
    pub run_on: crate::model::device::RunOn,
    /// Evaluate only the first N questions.
    #[arg(long, value_parser = crate::checks::positive)]
    pub limit: Option<usize>,
    /// Evaluate only the first N questions of each category (applied before --limit), so a
    /// small run still covers every category.
    #[arg(long, value_parser = crate::checks::positive)]
    pub per_category: Option<usize>,
    /// Write the JSON report here (checked writable before the run).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Replace an existing --report file.
    #[arg(long)]
    pub overwrite: bool,
    /// Chat template: the model's own by default ("auto"), or vicuna / llama3 / chatml.
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    /// Base seed; question i uses seed + i (the reference seeds per question).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Untimed warm-up generations (of each decoder) before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Leave out the reference's default system prompt of LLaMA-3 templates (conversations keep
    /// their own system message either way).
    #[arg(long)]
    pub no_system_prompt: bool,
}

impl EvalArgs {
    /// The library's plain options for this command line (reads --data where needed).
    pub fn options(&self) -> Result<crate::decode::eval::EvalOptions> {
        let t = &self.trees;
        let needs_calibration = t.tree.contains(&TreeSpec::Auto) && t.calib.is_none();
        let calibration_prompts = match (&t.calib_prompts, needs_calibration) {
            (Some(file), true) => crate::decode::eval::read_questions(file)?
                .into_iter()
                .map(|q| q.turns[0].clone())
                .collect(),
            _ => Vec::new(),
        };
        let calibration_texts = if needs_calibration && t.calib_prompts.is_none() {
            calibration_texts(t.data_dir("--tree auto without --calib")?, None)?
        } else {
            Vec::new()
        };
        Ok(crate::decode::eval::EvalOptions {
            model: self.model.clone(),
            draft: self.draft.clone(),
            prompts: self.prompts.clone(),
            trees: t.tree.clone(),
            calib: t.calib.clone(),
            calibration_texts,
            calibration_prompts,
            calibration_limit: t.calib_limit,
            calibrate: CalibrateOptions {
                max_depth: t.max_depth,
                // Sampling commits other drafts than greedy: measure the table it will use.
                temperature: self.temperature,
                seed: self.seed as i64,
                ..CalibrateOptions::default()
            },
            search: t.search(),
            dynamic: t.dynamic(),
            draft_vocab: t.draft_vocab_ids(&self.model)?,
            temperature: self.temperature,
            max_new_tokens: self.max_new_tokens,
            run_on: self.run_on.clone(),
            limit: self.limit,
            per_category: self.per_category,
            report: self.report.clone(),
            template: self.template,
            seed: self.seed,
            warmup: self.warmup,
            no_system_prompt: self.no_system_prompt,
        })
    }
}

pub fn run(args: &EvalArgs) -> Result<()> {
    if let Some(report) = &args.report {
        let t = &args.trees;
        let mut inputs = vec![
            ("--model", args.model.as_path()),
            ("--draft", args.draft.as_path()),
            ("--prompts", args.prompts.as_path()),
        ];
        inputs.extend(t.calib.as_deref().map(|p| ("--calib", p)));
        inputs.extend(t.data.as_deref().map(|p| ("--data", p)));
        inputs.extend(t.calib_prompts.as_deref().map(|p| ("--calib-prompts", p)));
        refuse_overlap(("--report", report), &inputs)?;
        claim_file(report, "--report", args.overwrite)?;
    }
    crate::decode::eval::run(&args.options()?)
}

#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    /// Teacher model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Exported draft head directory.
    #[arg(long)]
    pub draft: PathBuf,
    /// Prepared data directory: its eval split is calibrated on (never the evaluation prompts);
    /// its train split chooses --draft-vocab.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Calibrate on at most N texts of the eval split.
    #[arg(long, value_parser = crate::checks::positive)]
    pub limit: Option<usize>,
    /// Measure with a draft vocabulary of the N most frequent answer tokens (as `eval --draft-vocab`).
    #[arg(long, value_parser = crate::checks::positive)]
    pub draft_vocab: Option<usize>,
    /// Sibling ranks measured per depth.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 10)]
    pub top_k: usize,
    /// Depths measured.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 5)]
    pub max_depth: usize,
    /// Largest tree (tokens, root included) whose verification is timed.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 64)]
    pub max_tree_tokens: usize,
    /// Measure the acceptance table of tree sampling at this temperature (0: greedy), for
    /// `eval --tree auto --temperature T`.
    #[arg(long, allow_negative_numbers = true, value_parser = crate::checks::temperature, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the sampled table's draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Context lengths, comma-separated, after which verification is timed.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub contexts: Vec<usize>,
    /// Timed repeats per measurement (the median is kept), after 2 untimed ones.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 5)]
    pub repeats: usize,
    #[command(flatten)]
    pub run_on: crate::model::device::RunOn,
    /// Write the calibration (JSON) here (checked writable before the run).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run_calibrate(args: &CalibrateArgs) -> Result<()> {
    refuse_overlap(
        ("--out", &args.out),
        &[
            ("--model", &args.model),
            ("--draft", &args.draft),
            ("--prompts", &args.prompts),
        ],
    )?;
    claim_file(&args.out, "--out", args.overwrite)?;
    ensure!(
        !args.contexts.is_empty(),
        "--contexts names no context length"
    );
    let texts = calibration_texts(&args.prompts, args.limit)?;
    let vocab_ids = match args.draft_vocab {
        Some(n) => Some(draft_vocab_ids(&args.model, &args.prompts, n)?),
        None => None,
    };
    let options = CalibrateOptions {
        top_k: args.top_k,
        max_depth: args.max_depth,
        max_tree_tokens: args.max_tree_tokens,
        contexts: args.contexts.clone(),
        warmup: 2,
        repeats: args.repeats,
        temperature: args.temperature,
        seed: args.seed as i64,
    };
    crate::decode::calibrate::run(
        &args.model,
        &args.draft,
        &args.run_on,
        &texts,
        vocab_ids.as_deref(),
        &options,
        &args.out,
    )
}
