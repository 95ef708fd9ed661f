//! `clover data tasks`: packaged held-out prompt sets as the evaluation's question JSONL, one
//! file per task and a combined one, each a seeded sample of `per_task` questions.
//!
//! Every line is `{"question_id", "category", "turns": [..]}` as `clover eval --prompts` reads
//! it (`decode::eval::Question`), with the task in both: `question_id` is `<task>/<key>` (unique
//! across the combined file) and `category` is `<task>/<subset>` for tasks with subsets
//! (`mt-bench/writing`, `alpaca-eval/koala`) or `<task>` for those without (`humaneval`,
//! `gsm-symbolic`, `sharegpt`), so eval's per-category table reads per task. GSM problems carry
//! their reference result as an extra `answer` field (eval ignores it).
//!
//! The sample: a task's questions are grouped by subset, each group put in its seeded order
//! (`split::seeded_order` of the keys), and the groups taken from in turn until `per_task` are
//! chosen, so every subset is covered evenly; the chosen questions are written in source order.
//! A question is left out first when any kept turn is longer than `max_prompt_chars` characters
//! (eval refuses a prompt past the teacher's context) or blank; at most `max_turns` turns are
//! kept. A kind of task is a [`TaskSource`]; each lives in its own file here.

pub mod alpaca_eval;
pub mod gsm_symbolic;
pub mod humaneval;
pub mod mt_bench;
pub mod sharegpt;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use crate::data::split::seeded_order;

/// One question a task offers, before sampling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Unique within the task; names the question (`<task>/<key>`) and orders the sample.
    pub key: String,
    /// The subset it belongs to (MT-bench's category, AlpacaEval's dataset), if the task has them.
    pub subset: Option<String>,
    pub turns: Vec<String>,
    /// A reference answer, when the source has a short one (GSM's result).
    pub answer: Option<String>,
}

/// What a source offers: its questions in source order and what the manifest should record
/// about how they were made (GSM's template split, say).
pub struct TaskSet {
    pub candidates: Vec<Candidate>,
    pub details: serde_json::Value,
}

/// A packaged prompt set turned into questions.
pub trait TaskSource {
    /// The task's name: its file name and the first part of its categories and ids.
    fn name(&self) -> &'static str;
    /// The file or directory it reads.
    fn source(&self) -> &Path;
    /// Its questions. Fixed sets ignore the arguments; a generated one (GSM) makes `wanted`
    /// questions with `seed`.
    fn load(&self, wanted: usize, seed: u64) -> Result<TaskSet>;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskQuestion {
    pub question_id: String,
    pub category: String,
    pub turns: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

pub struct TasksOptions {
    /// The output directory (written whole by the caller, see `cli::data`).
    pub out: PathBuf,
    pub sources: Vec<Box<dyn TaskSource>>,
    pub per_task: usize,
    pub seed: u64,
    pub max_turns: usize,
    pub max_prompt_chars: usize,
}

/// What `tasks.json` records about one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRecord {
    pub task: String,
    pub file: String,
    pub source: PathBuf,
    /// Questions the source offers.
    pub available: usize,
    /// Of those, left out for a blank turn or one over `max_prompt_chars`.
    pub left_out: usize,
    pub written: usize,
    pub categories: BTreeMap<String, usize>,
    pub details: serde_json::Value,
}

/// `tasks.json`: the settings and one record per task.
#[derive(Debug, Clone, Serialize)]
pub struct TasksManifest {
    pub seed: u64,
    pub per_task: usize,
    pub max_turns: usize,
    pub max_prompt_chars: usize,
    pub combined: String,
    pub tasks: Vec<TaskRecord>,
}

/// The combined file's name.
pub const COMBINED: &str = "all.jsonl";
pub const MANIFEST: &str = "tasks.json";

/// Writes `<task>.jsonl` for every source, `all.jsonl` and `tasks.json` into `options.out`.
pub fn write_tasks(options: &TasksOptions) -> Result<TasksManifest> {
    ensure!(
        !options.sources.is_empty(),
        "no task source given: name at least one"
    );
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let mut combined = String::new();
    let mut records = Vec::new();
    for source in &options.sources {
        let (questions, record) = task_questions(source.as_ref(), options).with_context(|| {
            format!("task {} from {}", source.name(), source.source().display())
        })?;
        let text = jsonl(&questions)?;
        write(&options.out.join(&record.file), &text)?;
        combined += &text;
        records.push(record);
    }
    write(&options.out.join(COMBINED), &combined)?;
    let manifest = TasksManifest {
        seed: options.seed,
        per_task: options.per_task,
        max_turns: options.max_turns,
        max_prompt_chars: options.max_prompt_chars,
        combined: COMBINED.into(),
        tasks: records,
    };
    write(
        &options.out.join(MANIFEST),
        &serde_json::to_string_pretty(&manifest)?,
    )?;
    Ok(manifest)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn jsonl(questions: &[TaskQuestion]) -> Result<String> {
    let mut text = String::new();
    for question in questions {
        text += &serde_json::to_string(question)?;
        text.push('\n');
    }
    Ok(text)
}

/// One task's sample as questions, and its manifest record.
fn task_questions(
    source: &dyn TaskSource,
    options: &TasksOptions,
) -> Result<(Vec<TaskQuestion>, TaskRecord)> {
    let set = source.load(options.per_task, options.seed)?;
    let available = set.candidates.len();
    let mut keys = std::collections::HashSet::new();
    if let Some(twice) = set.candidates.iter().find(|c| !keys.insert(&c.key)) {
        anyhow::bail!("two questions are named {:?}", twice.key);
    }
    let usable: Vec<Candidate> = set
        .candidates
        .into_iter()
        .map(|mut c| {
            c.turns.truncate(options.max_turns);
            c
        })
        .filter(|c| {
            !c.turns.is_empty()
                && c.turns
                    .iter()
                    .all(|t| !t.trim().is_empty() && t.chars().count() <= options.max_prompt_chars)
        })
        .collect();
    let left_out = available - usable.len();
    let name = source.name();
    let questions: Vec<TaskQuestion> = sample(&usable, options.per_task, options.seed)
        .into_iter()
        .map(|c| TaskQuestion {
            question_id: format!("{name}/{}", c.key),
            category: match &c.subset {
                Some(subset) => format!("{name}/{subset}"),
                None => name.to_string(),
            },
            turns: c.turns.clone(),
            answer: c.answer.clone(),
        })
        .collect();
    let mut categories = BTreeMap::new();
    for q in &questions {
        *categories.entry(q.category.clone()).or_insert(0) += 1;
    }
    let record = TaskRecord {
        task: name.to_string(),
        file: format!("{name}.jsonl"),
        source: source.source().to_path_buf(),
        available,
        left_out,
        written: questions.len(),
        categories,
        details: set.details,
    };
    Ok((questions, record))
}

/// `wanted` candidates, the subsets taken from in turn, each in its seeded order; returned in
/// source order.
pub fn sample(candidates: &[Candidate], wanted: usize, seed: u64) -> Vec<&Candidate> {
    let mut groups: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        groups.entry(c.subset.as_deref()).or_default().push(i);
    }
    let index_of: BTreeMap<&str, usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.key.as_str(), i))
        .collect();
    let mut queues: Vec<std::vec::IntoIter<usize>> = groups
        .values()
        .map(|members| {
            let keys = members.iter().map(|&i| candidates[i].key.as_str());
            let order: Vec<usize> = seeded_order(keys, seed)
                .into_iter()
                .map(|k| index_of[k])
                .collect();
            order.into_iter()
        })
        .collect();
    let mut chosen = Vec::new();
    while chosen.len() < wanted {
        let before = chosen.len();
        for queue in &mut queues {
            if chosen.len() == wanted {
                break;
            }
            chosen.extend(queue.next());
        }
        if chosen.len() == before {
            break;
        }
    }
    chosen.sort_unstable();
    chosen.into_iter().map(|i| &candidates[i]).collect()
}
