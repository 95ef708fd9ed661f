//! `data prepare` refuses data its model cannot read: token ids past the model's embedding table
//! (a tokenizer from another model) and rows longer than its context. Both would otherwise pass
//! prepare, distill and train without a word, or panic inside libtorch much later.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

use crate::formats::chat::ChatTokenizer;

/// The two fields of the model's config.json that bound what a prepared row may hold.
#[derive(Deserialize)]
struct ModelLimits {
    vocab_size: Option<u64>,
    max_position_embeddings: Option<u64>,
}

/// Checks the tokenizer and `max_len` against `model_dir/config.json`; a dir without one (a
/// tokenizer only) has nothing to compare with. A config vocabulary larger than the tokenizer's
/// is common (padded embedding tables) and fine: only ids the model lacks are refused.
pub fn check_model_fits(model_dir: &Path, chat: &ChatTokenizer, max_len: usize) -> Result<()> {
    let config = model_dir.join("config.json");
    if !config.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    let limits: ModelLimits = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: vocab_size and max_position_embeddings must be non-negative integers",
            config.display()
        )
    })?;
    if let (Some(vocab_size), Some(max_id)) = (limits.vocab_size, chat.max_token_id()) {
        ensure!(
            u64::from(max_id) < vocab_size,
            "{}: token ids reach {max_id}, but {} has vocab_size {vocab_size}: the tokenizer is \
             not this model's (its ids would index past the embedding table)",
            model_dir.join("tokenizer.json").display(),
            config.display()
        );
    }
    if let Some(context) = limits.max_position_embeddings {
        ensure!(
            max_len as u64 <= context,
            "--max-len {max_len} exceeds the model's context: {} has max_position_embeddings \
             {context}; pass --max-len {context} or less",
            config.display()
        );
    }
    Ok(())
}
