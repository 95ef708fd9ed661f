//! AlpacaEval's 805 instructions (`example/outputs.json` of the alpaca-eval 0.6.6 source
//! archive; the data is CC BY-NC 4.0), its five `dataset`s (helpful_base, koala, oasst,
//! selfinstruct, vicuna) as subsets. Only the instructions are used, as one-turn questions.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::data::tasks::{Candidate, TaskSet, TaskSource};

pub struct AlpacaEval {
    pub path: PathBuf,
}

#[derive(Deserialize)]
struct Row {
    instruction: String,
    dataset: String,
}

impl TaskSource for AlpacaEval {
    fn name(&self) -> &'static str {
        "alpaca-eval"
    }

    fn source(&self) -> &Path {
        &self.path
    }

    fn load(&self, _wanted: usize, _seed: u64) -> Result<TaskSet> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let rows: Vec<Row> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected a JSON list of {{\"instruction\", \"dataset\", ..}}",
                self.path.display()
            )
        })?;
        let candidates = rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| Candidate {
                key: i.to_string(),
                subset: Some(row.dataset),
                turns: vec![row.instruction],
                answer: None,
            })
            .collect();
        Ok(TaskSet {
            candidates,
            details: serde_json::Value::Null,
        })
    }
}
