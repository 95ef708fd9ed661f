//! How the next token is picked (greedy or from softmax(logits / T)), the stop rules, and the
//! answer types shared by plain and speculative decoding.

use tch::{Kind, Tensor};

/// One row's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub token_ids: Vec<i64>,
    /// True when a stop token ended the row, false when max_new_tokens did.
    pub stopped: bool,
}

/// Timings of a batch-1 generation, for tokens/s figures.
#[derive(Debug, Clone)]
pub struct Timed {
    pub answer: Answer,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Pick the next token of every row from last-position logits [B,V].
pub fn pick_next(logits: &Tensor, temperature: f64) -> Tensor {
    if temperature <= 0.0 {
        logits.argmax(-1, false)
    } else {
        (logits.to_kind(Kind::Float) / temperature)
            .softmax(-1, Kind::Float)
            .multinomial(1, false)
            .squeeze_dim(-1)
    }
}

/// Sampling settings of a speculative generation.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// 0 = greedy (argmax); > 0 = sample from softmax(logits / temperature).
    pub temperature: f64,
    /// Seeds libtorch's generators for the whole generation, which holds them exclusively
    /// (`rng::seeded`): the same seed gives the same answer whatever else runs.
    pub seed: i64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The processed distribution softmax(logits / T) in f32 over the last dim (the law
    /// `generate::pick_next` samples from). Every acceptance test and every bonus draw uses it,
    /// which keeps speculative sampling lossless.
    pub fn probs(&self, logits: &Tensor) -> Tensor {
        (logits.to_kind(Kind::Float) / self.temperature).softmax(-1, Kind::Float)
    }
}

/// One sample per row of a probability tensor [n,V] -> i64 [n].
pub(crate) fn sample_rows(probs: &Tensor) -> Tensor {
    probs.multinomial(1, true).squeeze_dim(-1)
}

/// Refuses a prompt that leaves no room for `max_new` tokens in the teacher's context of
/// `context` positions: past it the model is outside anything it was trained on, and a long
/// prompt would only burn minutes of prefill before failing.
pub fn check_context(prompt_len: usize, max_new: usize, context: i64) -> anyhow::Result<()> {
    let room = (context.max(0) as usize).saturating_sub(max_new);
    anyhow::ensure!(
        prompt_len <= room,
        "the prompt has {prompt_len} tokens, but the teacher's context of {context} positions \
         leaves room for at most {room} with {max_new} new tokens (shorten the prompt or ask for \
         fewer new tokens)"
    );
    Ok(())
}

/// Stop rules of `generate::generate`: the answer ends before the first stop id (which is not
/// returned) or at `max_new` tokens. Truncates `tokens`; returns `Some(stopped)` when done.
pub(crate) fn apply_stop_rules(
    tokens: &mut Vec<i64>,
    max_new: usize,
    stop_ids: &[i64],
) -> Option<bool> {
    if let Some(i) = tokens.iter().position(|t| stop_ids.contains(t)) {
        if i < max_new {
            tokens.truncate(i);
            return Some(true);
        }
    }
    if tokens.len() >= max_new {
        tokens.truncate(max_new);
        return Some(false);
    }
    None
}
