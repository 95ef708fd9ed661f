//! The held-out ShareGPT conversations (`data import-sharegpt --held-out`): their human turns,
//! never trained on, as questions.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::data::sharegpt::{read_conversations, skip_report};
use crate::data::tasks::{Candidate, TaskSet, TaskSource};
use crate::formats::chat::Role;

pub struct ShareGptHeldOut {
    pub path: PathBuf,
}

impl TaskSource for ShareGptHeldOut {
    fn name(&self) -> &'static str {
        "sharegpt"
    }

    fn source(&self) -> &Path {
        &self.path
    }

    fn load(&self, _wanted: usize, _seed: u64) -> Result<TaskSet> {
        let (conversations, skipped) = read_conversations(&self.path)?;
        if let Some(report) = skip_report(&self.path, &skipped) {
            eprintln!("{report}");
        }
        let candidates = conversations
            .into_iter()
            .map(|c| Candidate {
                turns: c
                    .messages
                    .into_iter()
                    .filter(|m| m.role == Role::User)
                    .map(|m| m.content)
                    .collect(),
                key: c.id,
                subset: None,
                answer: None,
            })
            .collect();
        Ok(TaskSet {
            candidates,
            details: serde_json::Value::Null,
        })
    }
}
