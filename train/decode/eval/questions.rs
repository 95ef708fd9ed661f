//! The evaluation's questions: MT-bench / Spec-Bench style JSONL, one question per line.

use std::path::Path;

use anyhow::{ensure, Context, Result};

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
