//! GSM-style math word problems generated from held-out templates of reasoning-gym's
//! `gsm_symbolic` (PyPI reasoning-gym 0.1.25, Apache-2.0): each template is one GSM8K question
//! as a Python generator of new names and numbers (`scripts/gsm_symbolic.py` runs them).
//!
//! The split is by template, never by seed: a fixed [`EVAL_FRACTION`] of the package's usable
//! templates (`tasks_ok`), those with the lowest hash of `gsm_symbolic/<n>` under the fixed
//! [`SPLIT_SEED`], are held out for evaluation, the rest are left to train on. Another `--seed`
//! draws other problems from the same held-out templates, so problems seen in training (from
//! the other templates) never share a template with an evaluated one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::data::split::seeded_order;
use crate::data::tasks::{Candidate, TaskSet, TaskSource};

/// The generator script, embedded so the binary needs no checkout to run it.
const SCRIPT: &str = include_str!("../../../scripts/gsm_symbolic.py");

/// Share of the usable templates held out for evaluation (17 of reasoning-gym 0.1.25's 85).
pub const EVAL_FRACTION: f64 = 0.2;
/// The template split's seed: fixed, so the split never moves with `--seed`.
pub const SPLIT_SEED: u64 = 0;

pub struct GsmSymbolic {
    /// The `reasoning_gym` package directory (where `utils.py` is).
    pub package: PathBuf,
    /// The Python 3 interpreter to run the generators with.
    pub python: PathBuf,
}

#[derive(Deserialize)]
struct Problem {
    template: u32,
    index: u64,
    question: String,
    answer: String,
}

/// The templates held out for evaluation, and those left to train on, both sorted.
pub fn template_split(usable: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let names: Vec<String> = usable.iter().map(|t| format!("gsm_symbolic/{t}")).collect();
    let held = (usable.len() as f64 * EVAL_FRACTION).ceil() as usize;
    let order = seeded_order(names.iter().map(String::as_str), SPLIT_SEED);
    let number = |name: &str| {
        name["gsm_symbolic/".len()..]
            .parse::<u32>()
            .expect("made above")
    };
    let mut eval: Vec<u32> = order[..held].iter().map(|n| number(n)).collect();
    let mut train: Vec<u32> = order[held..].iter().map(|n| number(n)).collect();
    eval.sort_unstable();
    train.sort_unstable();
    (eval, train)
}

impl GsmSymbolic {
    /// Runs the script with `args`; its standard output.
    fn run(&self, args: &[String]) -> Result<String> {
        let output = Command::new(&self.python)
            .arg("-c")
            .arg(SCRIPT)
            .arg("--package")
            .arg(&self.package)
            .args(args)
            .output()
            .with_context(|| {
                format!(
                    "running {} (the Python 3 that runs scripts/gsm_symbolic.py; --python)",
                    self.python.display()
                )
            })?;
        if !output.status.success() {
            bail!(
                "scripts/gsm_symbolic.py on {} failed ({}):\n{}",
                self.package.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end()
            );
        }
        String::from_utf8(output.stdout).context("the script printed invalid UTF-8")
    }

    pub fn usable_templates(&self) -> Result<Vec<u32>> {
        let text = self.run(&["--list".into()])?;
        serde_json::from_str(&text)
            .with_context(|| format!("the template list is not a JSON list of numbers: {text}"))
    }
}

impl TaskSource for GsmSymbolic {
    fn name(&self) -> &'static str {
        "gsm-symbolic"
    }

    fn source(&self) -> &Path {
        &self.package
    }

    fn load(&self, wanted: usize, seed: u64) -> Result<TaskSet> {
        let (eval, train) = template_split(&self.usable_templates()?);
        if eval.is_empty() {
            bail!(
                "{}: no usable gsm_symbolic template",
                self.package.display()
            );
        }
        let templates: Vec<String> = eval.iter().map(u32::to_string).collect();
        let text = self.run(&[
            "--templates".into(),
            templates.join(","),
            "--count".into(),
            wanted.to_string(),
            "--seed".into(),
            seed.to_string(),
        ])?;
        let mut candidates = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let problem: Problem = serde_json::from_str(line)
                .with_context(|| format!("the script printed a bad problem: {line}"))?;
            candidates.push(Candidate {
                key: format!("t{}-{}", problem.template, problem.index),
                subset: None,
                turns: vec![problem.question],
                answer: Some(problem.answer),
            });
        }
        Ok(TaskSet {
            candidates,
            details: serde_json::json!({
                "held_out_templates": eval,
                "train_templates": train,
                "rule": format!(
                    "the ceil({EVAL_FRACTION} x {}) usable templates with the lowest hash of \
                     gsm_symbolic/<n> (seed {SPLIT_SEED}) are held out",
                    eval.len() + train.len()
                ),
                "problem_seed": seed,
            }),
        })
    }
}
