//! `clover eval`: tau and speed of speculative decoding with a draft head on MT-bench /
//! Spec-Bench style prompts, against plain decoding of the same prompts (docs/clover2.md §5).
//!
//! Each question's turns are asked in order with the model's chat template; the history keeps
//! the PLAIN (baseline) answer to each turn, so both decoders always see the same prompt. At T = 0
//! the speculative answer must be identical (any difference is counted in `lossless_mismatches`);
//! at T > 0 both answers are samples of the same law.
//!
//! Definitions (docs/clover2.md §5, G12):
//! - `tau` = committed tokens / verification steps, pooled over all turns: each step commits its
//!   accepted drafts plus the teacher's own token (bonus counted). The prefill's first token is
//!   not a verification step and is not counted.
//! - `tau_reference_variant` = the same tokens / Σ(steps − 1) per turn (the reference
//!   `tau_spe.py` divides by the last loop index), slightly larger.
//! - `acceptance_per_depth[d-1]` = fraction of steps that accepted at least d drafts.
//! - `tokens_per_s` = answer tokens / wall seconds (prefill included), pooled over all turns (the
//!   reference averages per-question ratios; pooling weighs long answers more). `speedup` is its
//!   ratio to `baseline_tokens_per_s`.
//! - `draft_ms_per_step` (depth-0 call on the accepted states + tree expansion),
//!   `verify_ms_per_step` (teacher tree forward, acceptance, KV compaction) and
//!   `other_ms_per_step` (the rest of the decode loop: bookkeeping, stop rules), each per
//!   verification step; the prefill is in none of them.
//!
//! Several tree settings (`--tree default,auto,dynamic`) run on the same prompts against one
//! shared plain-decoding baseline; `trees` reports each, the top-level fields the first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use crate::decode::calibrate::{
    answered_texts, calibrate, CalibrateOptions, Calibration, CalibrationText,
};
use crate::decode::dynamic::DynamicTree;
use crate::decode::generate::{generate, GenerationConfig};
use crate::decode::sampling::{Sampling, Timed};
use crate::decode::speculative::{
    drafter_for, drafting_vocab, generate_with_mode, DraftVocab, SpecStats, TreeMode,
};
use crate::decode::tree::Tree;
use crate::decode::tree_search::{best_tree, SearchLimits, SearchResult};
use crate::decode::tree_spec::TreeSpec;
use crate::formats::chat::{ChatTokenizer, Message, Role, TemplateName};
use crate::model::device::device_name;
use crate::model::head::{load_head, DraftHead};
use crate::model::head_config::HeadKind;
use crate::model::teacher::Teacher;
use crate::progress::Progress;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Teacher model directory (HF layout).
    pub model: PathBuf,
    /// Exported draft head directory (model.safetensors + config.json).
    pub draft: PathBuf,
    /// JSONL questions: {"question_id", "category", "turns": [..]} (MT-bench / Spec-Bench).
    pub prompts: PathBuf,
    /// Tree settings, evaluated in turn on the same prompts (the first gives the top-level
    /// figures); "dynamic" is sized by `dynamic`.
    pub trees: Vec<TreeSpec>,
    /// Calibration file for "auto"; without one, "auto" calibrates on `calibration_texts`.
    pub calib: Option<PathBuf>,
    /// Texts "auto" calibrates on when there is no `calib` (the prepared data's eval split).
    pub calibration_texts: Vec<CalibrationText>,
    /// Or prompts whose greedy answers "auto" calibrates on (`--calib-prompts`); any that is
    /// also an evaluated prompt is left out.
    pub calibration_prompts: Vec<String>,
    /// Calibrate on at most this many texts or held-out prompts.
    pub calibration_limit: Option<usize>,
    /// How "auto" calibrates when it has to.
    pub calibrate: CalibrateOptions,
    /// Bounds of the "auto" tree search.
    pub search: SearchLimits,
    /// Size of the "dynamic" tree.
    pub dynamic: DynamicTree,
    /// Draft vocabulary: the teacher ids the draft scores (None = the whole vocabulary).
    pub draft_vocab: Option<Vec<i64>>,
    /// 0 = greedy; > 0 = lossless tree speculative sampling.
    pub temperature: f64,
    pub max_new_tokens: usize,
    /// Device and dtype; the head runs in the teacher's dtype.
    pub run_on: crate::model::device::RunOn,
    /// Evaluate only the first N questions.
    pub limit: Option<usize>,
    /// Evaluate only the first N questions of each category (applied before --limit), so a
    /// small run still covers every category.
    pub per_category: Option<usize>,
    /// Write the JSON report here.
    pub report: Option<PathBuf>,
    /// Chat template: the model's own by default ("auto"), or vicuna / llama3 / chatml.
    pub template: Option<TemplateName>,
    /// Base seed; question i uses seed + i (the reference seeds per question).
    pub seed: u64,
    /// Untimed warm-up generations (of each decoder) before measuring.
    pub warmup: usize,
    /// Leave out the reference's default system prompt of LLaMA-3 templates (conversations keep
    /// their own system message either way).
    pub no_system_prompt: bool,
}

/// One MT-bench / Spec-Bench question.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Question {
    pub question_id: serde_json::Value,
    #[serde(default = "default_category")]
    pub category: String,
    pub turns: Vec<String>,
}

fn default_category() -> String {
    "default".into()
}

/// Read a JSONL question file (blank lines skipped).
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: expected {{\"question_id\", \"category\", \"turns\": [..]}}",
                path.display(),
                i + 1
            )
        })?;
        ensure!(
            !q.turns.is_empty(),
            "{} line {}: question {} has no turns",
            path.display(),
            i + 1,
            q.question_id
        );
        out.push(q);
    }
    ensure!(!out.is_empty(), "{} holds no questions", path.display());
    Ok(out)
}

/// Measurements of one turn.
#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Serialize, PartialEq)]
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

fn pool<'a>(records: impl Iterator<Item = &'a TurnRecord>) -> Pooled {
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

/// The JSON report of `clover eval`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub tau: f64,
    pub tau_reference_variant: f64,
    pub tau_per_category: BTreeMap<String, f64>,
    pub acceptance_per_depth: Vec<f64>,
    pub tokens_per_s: f64,
    pub baseline_tokens_per_s: f64,
    pub speedup: f64,
    pub tree_tokens: usize,
    pub temperature: f64,
    pub device: String,
    pub dtype: String,
    pub n_prompts: usize,
    pub n_turns: usize,
    pub new_tokens: usize,
    pub baseline_new_tokens: usize,
    pub verification_steps: usize,
    pub lossless_mismatches: usize,
    pub max_new_tokens: usize,
    pub head: String,
    pub head_parameters: i64,
    pub draft_dir: String,
    /// Σ draft / Σ verify seconds of the speculative steps (see `TurnRecord`).
    pub draft_seconds: f64,
    pub verify_seconds: f64,
    pub draft_ms_per_step: f64,
    pub verify_ms_per_step: f64,
    pub other_ms_per_step: f64,
    /// Size of the draft vocabulary (None = the teacher's whole vocabulary).
    pub draft_vocab: Option<usize>,
    /// Every tree setting evaluated, the first one being the top-level figures.
    pub trees: Vec<TreeRow>,
    /// What `--tree auto` chose and why.
    pub auto: Option<AutoChoice>,
    pub per_category: BTreeMap<String, Pooled>,
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
#[derive(Debug, Clone, Serialize)]
pub struct TreeRow {
    /// The setting as asked for: "default", "auto", "dynamic" or a tree file.
    pub tree: String,
    /// Tokens verified per step (root included; 1 = plain decoding).
    pub tree_tokens: usize,
    pub tau: f64,
    pub tau_per_category: BTreeMap<String, f64>,
    pub acceptance_per_depth: Vec<f64>,
    pub draft_ms_per_step: f64,
    pub verify_ms_per_step: f64,
    pub other_ms_per_step: f64,
    pub tokens_per_s: f64,
    pub speedup: f64,
    pub lossless_mismatches: usize,
}

impl TreeRow {
    fn new(tree: &str, r: &EvalReport) -> Self {
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

/// What `--tree auto` chose: the search's answer and the calibration it read or measured.
#[derive(Debug, Clone, Serialize)]
pub struct AutoChoice {
    pub search: SearchResult,
    pub calibration: Calibration,
}

/// What a tree setting decodes with.
pub enum TreeKind {
    /// Plain decoding (what "auto" picks when no tree pays).
    Plain,
    Static(Tree),
    Dynamic(DynamicTree),
}

/// A named tree setting.
pub struct TreeSetting {
    pub name: String,
    pub kind: TreeKind,
}

impl TreeSetting {
    pub fn tree_tokens(&self) -> usize {
        match &self.kind {
            TreeKind::Plain => 1,
            TreeKind::Static(t) => t.len(),
            TreeKind::Dynamic(d) => d.tokens,
        }
    }

    pub fn max_depth(&self) -> usize {
        self.mode().map_or(0, |m| m.max_depth())
    }

    fn mode(&self) -> Option<TreeMode<'_>> {
        match &self.kind {
            TreeKind::Plain => None,
            TreeKind::Static(t) => Some(TreeMode::Static(t)),
            TreeKind::Dynamic(d) => Some(TreeMode::Dynamic(*d)),
        }
    }
}

/// Everything one evaluation needs, loaded once.
struct Setup {
    teacher: Teacher,
    head: DraftHead,
    chat: ChatTokenizer,
    vocab: Option<DraftVocab>,
    settings: Vec<TreeSetting>,
}

/// The "auto" tree: the search's pick on `calib` (read, or measured now).
fn auto_setting(
    args: &EvalOptions,
    (teacher, chat): (&Teacher, &ChatTokenizer),
    head: &DraftHead,
    vocab: Option<&DraftVocab>,
    evaluated: &[Question],
) -> Result<(TreeSetting, AutoChoice)> {
    let calibration = match &args.calib {
        Some(path) => Calibration::read(path)?,
        None => {
            let limit = args.calibration_limit.unwrap_or(usize::MAX);
            let texts = if args.calibration_prompts.is_empty() {
                args.calibration_texts.iter().take(limit).cloned().collect()
            } else {
                let mut held_out = held_out_prompts(&args.calibration_prompts, evaluated);
                ensure!(
                    !held_out.is_empty(),
                    "every --calib-prompts prompt is also evaluated: calibrating on them would \
                     fit the tree to the test"
                );
                held_out.truncate(limit);
                answered_texts(teacher, chat, &held_out, args.max_new_tokens)?
            };
            ensure!(
                !texts.is_empty(),
                "--tree auto needs a calibration: --calib FILE (from `clover calibrate`), \
                 --calib-prompts FILE, or --data DIR (prepared data whose eval split calibrates)"
            );
            calibrate(teacher, head, vocab, &texts, &args.calibrate)?
        }
    };
    ensure!(
        (calibration.temperature - args.temperature).abs() < 1e-9,
        "the calibration's acceptance table is for temperature {} but this evaluation samples at \
         {}: calibrate again with --temperature {}",
        calibration.temperature,
        args.temperature,
        args.temperature
    );
    let used = drafting_vocab(head, vocab);
    ensure!(
        calibration.draft_vocab == used,
        "the calibration was measured with draft vocabulary {:?} but this evaluation drafts with \
         {used:?}: calibrate again with the same --draft-vocab",
        calibration.draft_vocab
    );
    let search = best_tree(&calibration.acceptance, &calibration.costs, args.search);
    let kind = if search.is_plain() {
        TreeKind::Plain
    } else {
        TreeKind::Static(Tree::from_paths(&search.paths, calibration.top_k)?)
    };
    eprintln!(
        "auto tree: {} ({} tokens), expected tau {:.3}, {:.1} tokens/s predicted against {:.1} \
         plain",
        if search.is_plain() {
            "plain decoding".to_string()
        } else {
            serde_json::to_string(&search.paths)?
        },
        search.paths.len() + 1,
        search.expected_tau,
        search.tokens_per_s,
        search.plain_tokens_per_s
    );
    Ok((
        TreeSetting {
            name: "auto".into(),
            kind,
        },
        AutoChoice {
            search,
            calibration,
        },
    ))
}

/// The calibration prompts that are no turn of an evaluated question.
fn held_out_prompts(prompts: &[String], evaluated: &[Question]) -> Vec<String> {
    let asked: std::collections::HashSet<&str> = evaluated
        .iter()
        .flat_map(|q| q.turns.iter().map(String::as_str))
        .collect();
    prompts
        .iter()
        .filter(|p| !asked.contains(p.as_str()))
        .cloned()
        .collect()
}

/// The settings named on the command line, in order.
fn tree_settings(
    args: &EvalOptions,
    (teacher, chat): (&Teacher, &ChatTokenizer),
    head: &DraftHead,
    vocab: Option<&DraftVocab>,
    evaluated: &[Question],
) -> Result<(Vec<TreeSetting>, Option<AutoChoice>)> {
    ensure!(!args.trees.is_empty(), "--tree names no tree setting");
    let mut settings = Vec::new();
    let mut auto = None;
    for spec in &args.trees {
        let name = spec.to_string();
        let setting = match spec {
            TreeSpec::Dynamic | TreeSpec::Auto
                if head.config().options.head != HeadKind::Clover2 =>
            {
                anyhow::bail!(
                    "--tree {spec} works with Clover-2 heads (the searched and grown trees are \
                     only validated on them); this head is {}: use a static tree",
                    head.config().options.head.name()
                )
            }
            TreeSpec::Dynamic => {
                args.dynamic.check()?;
                TreeSetting {
                    name,
                    kind: TreeKind::Dynamic(args.dynamic),
                }
            }
            TreeSpec::Auto => {
                let (setting, choice) =
                    auto_setting(args, (teacher, chat), head, vocab, evaluated)?;
                auto = Some(choice);
                setting
            }
            TreeSpec::Default | TreeSpec::Chain(_) | TreeSpec::File(_) => TreeSetting {
                name,
                kind: TreeKind::Static(spec.static_tree("eval")?),
            },
        };
        settings.push(setting);
    }
    Ok((settings, auto))
}

pub fn run(args: &EvalOptions) -> Result<()> {
    let (device, kind) = args.run_on.resolve()?;
    let teacher = Teacher::load(&args.model, device, kind)?;
    let head = load_head(&args.draft, &teacher)?;
    let chat = ChatTokenizer::from_model_dir(&args.model, args.template.map(TemplateName::as_str))?
        .with_system_prompt(!args.no_system_prompt);
    let max_top_k = crate::decode::tree::DEFAULT_TOP_K.max(args.dynamic.top_k);
    let vocab = match &args.draft_vocab {
        Some(ids) => Some(head.slice_vocab(ids, max_top_k)?),
        None => None,
    };
    if let Some(trained) = head.draft_vocab() {
        ensure!(
            trained.len() >= max_top_k,
            "the head's draft vocabulary of {} tokens is smaller than the tree's top-k {max_top_k}",
            trained.len()
        );
    }
    let mut questions = read_questions(&args.prompts)?;
    if let Some(n) = args.per_category {
        let mut seen = std::collections::HashMap::new();
        questions.retain(|q| {
            let count = seen.entry(q.category.clone()).or_insert(0usize);
            *count += 1;
            *count <= n
        });
    }
    if let Some(n) = args.limit {
        questions.truncate(n);
    }
    let (settings, auto) =
        tree_settings(args, (&teacher, &chat), &head, vocab.as_ref(), &questions)?;
    for setting in &settings {
        if let TreeKind::Static(tree) = &setting.kind {
            crate::decode::speculative::check_tree_for(&head, tree)?;
        }
    }
    let setup = Setup {
        teacher,
        head,
        chat,
        vocab,
        settings,
    };
    warm_up(&setup, &questions[0], args)?;
    let records = evaluate(&setup, &questions, args)?;
    let reports: Vec<EvalReport> = setup
        .settings
        .iter()
        .zip(&records)
        .map(|(setting, recs)| {
            summarize(
                recs,
                &EvalSettings {
                    max_depth: setting.max_depth(),
                    tree_tokens: setting.tree_tokens(),
                    temperature: args.temperature,
                    device: device_name(device),
                    dtype: format!("{kind:?}"),
                    n_prompts: questions.len(),
                    max_new_tokens: args.max_new_tokens,
                    head: setup.head.config().options.head.name().to_string(),
                    head_parameters: setup.head.num_parameters(),
                    draft_dir: args.draft.display().to_string(),
                },
            )
        })
        .collect();
    let mut report = reports[0].clone();
    report.trees = setup
        .settings
        .iter()
        .zip(&reports)
        .map(|(s, r)| TreeRow::new(&s.name, r))
        .collect();
    report.draft_vocab = drafting_vocab(&setup.head, setup.vocab.as_ref());
    report.auto = auto;
    print_table(&report);
    if let Some(path) = &args.report {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing report {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// Decode one prompt with one tree setting. "auto" may have picked plain decoding: that is the
/// baseline's own run `plain` (same prompt, config and seed), counted as one verification step
/// per token without a draft.
fn decode_with(
    setup: &Setup,
    setting: &TreeSetting,
    prompt: &[i64],
    (cfg, plain): (&GenerationConfig, &Timed),
) -> Result<(Timed, SpecStats)> {
    let sampling = Sampling {
        temperature: cfg.temperature,
        seed: cfg.seed as i64,
    };
    match setting.mode() {
        None => {
            let timed = plain.clone();
            let stats = SpecStats {
                accepted: vec![0; timed.answer.token_ids.len().saturating_sub(1)],
                max_depth: 0,
                draft_seconds: 0.0,
                verify_seconds: timed.decode_seconds,
            };
            Ok((timed, stats))
        }
        Some(mode) => {
            let mut drafter = drafter_for(&setup.head, setup.vocab.as_ref());
            generate_with_mode(
                &setup.teacher,
                drafter.as_mut(),
                mode,
                prompt,
                cfg.max_new_tokens,
                sampling,
                &cfg.stop_ids,
            )
        }
    }
}

/// Untimed runs so one-off costs (kernel selection, allocator growth) stay out of the figures.
fn warm_up(setup: &Setup, question: &Question, args: &EvalOptions) -> Result<()> {
    let prompt = setup
        .chat
        .encode_prompt(&[Message::new(Role::User, question.turns[0].clone())])?;
    let max_new = args.max_new_tokens.min(16);
    for _ in 0..args.warmup {
        let cfg = plain_config(args, max_new, args.seed, vec![]);
        let plain = generate(&setup.teacher, &prompt, &cfg)?;
        for setting in &setup.settings {
            decode_with(setup, setting, &prompt, (&cfg, &plain))?;
        }
    }
    Ok(())
}

fn plain_config(
    args: &EvalOptions,
    max_new: usize,
    seed: u64,
    stop_ids: Vec<i64>,
) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: max_new,
        temperature: args.temperature,
        seed,
        stop_ids,
    }
}

/// Ask every turn of every question with plain decoding and with every tree setting; one
/// record list per setting.
fn evaluate(
    setup: &Setup,
    questions: &[Question],
    args: &EvalOptions,
) -> Result<Vec<Vec<TurnRecord>>> {
    let total: usize = questions.iter().map(|q| q.turns.len()).sum();
    let mut bar = Progress::new("eval (turns)", total as u64);
    let stop_ids = setup.chat.stop_ids();
    let mut records: Vec<Vec<TurnRecord>> = setup
        .settings
        .iter()
        .map(|_| Vec::with_capacity(total))
        .collect();
    for (qi, q) in questions.iter().enumerate() {
        let seed = args.seed + qi as u64;
        let mut history: Vec<Message> = Vec::new();
        for (ti, turn) in q.turns.iter().enumerate() {
            history.push(Message::new(Role::User, turn.clone()));
            let prompt = setup.chat.encode_prompt(&history)?;
            let cfg = plain_config(args, args.max_new_tokens, seed, stop_ids.clone());
            let plain = generate(&setup.teacher, &prompt, &cfg).with_context(|| {
                format!("question {} turn {}: plain decoding", q.question_id, ti + 1)
            })?;
            for (setting, recs) in setup.settings.iter().zip(records.iter_mut()) {
                let (spec, stats) = decode_with(setup, setting, &prompt, (&cfg, &plain))
                    .with_context(|| {
                        format!(
                            "question {} turn {}: tree {}",
                            q.question_id,
                            ti + 1,
                            setting.name
                        )
                    })?;
                let mismatch =
                    args.temperature <= 0.0 && spec.answer.token_ids != plain.answer.token_ids;
                recs.push(TurnRecord {
                    question_id: id_string(&q.question_id),
                    category: q.category.clone(),
                    turn: ti + 1,
                    new_tokens: spec.answer.token_ids.len(),
                    seconds: spec.prefill_seconds + spec.decode_seconds,
                    baseline_new_tokens: plain.answer.token_ids.len(),
                    baseline_seconds: plain.prefill_seconds + plain.decode_seconds,
                    mismatch,
                    draft_seconds: stats.draft_seconds,
                    verify_seconds: stats.verify_seconds,
                    prefill_seconds: spec.prefill_seconds,
                    accepted: stats.accepted,
                });
            }
            let answer = setup.chat.decode(&plain.answer.token_ids)?;
            history.push(Message::new(Role::Assistant, answer));
            let so_far = pool(records[0].iter());
            bar.set_message(format!(
                "tau {:.2} speedup {:.2}x",
                so_far.tau, so_far.speedup
            ));
            bar.inc(1);
        }
    }
    bar.finish();
    Ok(records)
}

fn id_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_table(r: &EvalReport) {
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
