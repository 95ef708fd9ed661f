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
//!
//! The parts: the questions (`questions`), the tree settings (`tree_settings`), the run (here)
//! and the report (`report`).

pub mod questions;
pub mod report;
pub mod tree_settings;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::decode::calibrate::{CalibrateOptions, CalibrationText};
use crate::decode::drafter::{check_tree_for, drafter_for, drafting_vocab, DraftVocab};
use crate::decode::dynamic::DynamicTree;
use crate::decode::generate::{generate, GenerationConfig};
use crate::decode::sampling::{Sampling, Timed};
use crate::decode::speculative::{generate_with_mode, SpecStats};
use crate::decode::tree_search::SearchLimits;
use crate::decode::tree_spec::TreeSpec;
use crate::formats::chat::{ChatTokenizer, Message, Role, TemplateName};
use crate::model::device::device_name;
use crate::model::head::{load_head, DraftHead};
use crate::model::teacher::Teacher;
use crate::progress::Progress;

pub use questions::{read_questions, Question};
use report::pool;
use report::print_table;
pub use report::{summarize, EvalReport, EvalSettings, Pooled, TreeRow, TurnRecord};
use tree_settings::tree_settings;
pub use tree_settings::{AutoChoice, TreeKind, TreeSetting};

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

/// Everything one evaluation needs, loaded once.
struct Setup {
    teacher: Teacher,
    head: DraftHead,
    chat: ChatTokenizer,
    vocab: Option<DraftVocab>,
    settings: Vec<TreeSetting>,
}

pub fn run(args: &EvalOptions) -> Result<()> {
    let (device, kind) = args.run_on.resolve()?;
    let teacher = Teacher::load(&args.model, device, kind)?;
    let head = load_head(&args.draft, &teacher)?;
    let chat = ChatTokenizer::from_model_dir(&args.model, args.template.map(TemplateName::as_str))?
        .with_system_prompt(!args.no_system_prompt);
    let vocab = drafting_vocab_of(&head, args)?;
    let questions = chosen_questions(args)?;
    let (settings, auto) =
        tree_settings(args, (&teacher, &chat), &head, vocab.as_ref(), &questions)?;
    for setting in &settings {
        if let TreeKind::Static(tree) = &setting.kind {
            check_tree_for(&head, tree)?;
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
    let stated = EvalSettings {
        temperature: args.temperature,
        device: device_name(device),
        dtype: format!("{kind:?}"),
        n_prompts: questions.len(),
        max_new_tokens: args.max_new_tokens,
        head: setup.head.config().options.head.name().to_string(),
        head_parameters: setup.head.num_parameters(),
        draft_dir: args.draft.display().to_string(),
        ..EvalSettings::default()
    };
    let mut report = report_of(&setup, &records, &stated);
    report.auto = auto;
    print_table(&report);
    if let Some(path) = &args.report {
        write_report(&report, path)?;
    }
    Ok(())
}

/// The vocabulary `--draft-vocab` slices, checked with the head's own against the tree's top-k.
fn drafting_vocab_of(head: &DraftHead, args: &EvalOptions) -> Result<Option<DraftVocab>> {
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
    Ok(vocab)
}

/// The questions evaluated: the first `--per-category` of each category, then `--limit`.
fn chosen_questions(args: &EvalOptions) -> Result<Vec<Question>> {
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
    Ok(questions)
}

/// The report: the first setting's figures at the top level, every setting's in `trees`.
fn report_of(setup: &Setup, records: &[Vec<TurnRecord>], stated: &EvalSettings) -> EvalReport {
    let reports: Vec<EvalReport> = setup
        .settings
        .iter()
        .zip(records)
        .map(|(setting, recs)| {
            let settings = EvalSettings {
                max_depth: setting.max_depth(),
                tree_tokens: setting.tree_tokens(),
                ..stated.clone()
            };
            summarize(recs, &settings)
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
    report
}

fn write_report(report: &EvalReport, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing report {}", path.display()))?;
    eprintln!("report written to {}", path.display());
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
