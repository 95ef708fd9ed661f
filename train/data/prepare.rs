//! `clover data prepare`: conversations -> chat-template rendering with an assistant loss mask ->
//! tokenized parquet shards with a deterministic train/eval split and a manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::model_fit::check_model_fits;
use crate::data::shards::{write_samples, Sample, Split};
use crate::data::sharegpt::{
    conversation_of, is_made_up_id, read_conversations, Conversation, SkipReason, Skipped,
};
pub use crate::data::split::split_of;
use crate::formats::chat::{ChatTokenizer, TemplateName};
use crate::progress::Progress;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// ShareGPT file: a JSON list, JSONL, or parquet with a `conversations` column.
    pub input: PathBuf,
    /// HF-style model dir (tokenizer.json, tokenizer_config.json).
    pub model: PathBuf,
    /// The chat template: auto (the model's own chat_template), vicuna, llama3 or chatml.
    pub template: TemplateName,
    pub out: PathBuf,
    /// Conversations longer than this many tokens are truncated to it (as the reference does).
    pub max_len: usize,
    pub eval_fraction: f64,
    pub seed: u64,
    /// Leave out the reference's default system prompt of LLaMA-3 templates (conversations keep
    /// their own system message either way).
    pub no_system_prompt: bool,
    /// Held-out conversations (ShareGPT, e.g. `data import-sharegpt --held-out`): a record of
    /// one of them is left out of both splits, and the manifest lists them.
    pub held_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Records read from the input.
    pub read: usize,
    pub kept: usize,
    pub train: usize,
    pub eval: usize,
    /// Skipped records by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Kept conversations whose first (assistant) message was dropped.
    pub dropped_first_assistant: usize,
    /// Kept conversations cut to `max_len` tokens.
    pub truncated: usize,
    /// Records left out because their conversation is held out (`--held-out`).
    #[serde(default)]
    pub held_out: usize,
    pub tokens: usize,
    pub assistant_tokens: usize,
}

impl Summary {
    fn count_skip(&mut self, reason: SkipReason) {
        *self.skipped.entry(reason.name().to_string()).or_default() += 1;
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "read {} records, kept {} (train {}, eval {})",
            self.read, self.kept, self.train, self.eval
        )?;
        let skipped: usize = self.skipped.values().sum();
        writeln!(f, "skipped {skipped}")?;
        for (reason, count) in &self.skipped {
            writeln!(f, "  {reason}: {count}")?;
        }
        writeln!(
            f,
            "first message from the assistant dropped: {}",
            self.dropped_first_assistant
        )?;
        writeln!(
            f,
            "truncated to --max-len (their tails are not trained on): {}",
            self.truncated
        )?;
        if self.held_out > 0 {
            writeln!(f, "left out as held out (--held-out): {}", self.held_out)?;
        }
        write!(
            f,
            "tokens {}, assistant tokens {}",
            self.tokens, self.assistant_tokens
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub source: PathBuf,
    pub template: String,
    /// The default system prompt put before conversations without one (LLaMA-3), if any.
    #[serde(default)]
    pub system_prompt: Option<String>,
    pub model: PathBuf,
    pub max_len: usize,
    pub eval_fraction: f64,
    pub seed: u64,
    pub vocab_size: usize,
    pub train_shards: Vec<String>,
    pub eval_shards: Vec<String>,
    pub summary: Summary,
    /// The held-out conversations left out (`--held-out`), so a reader can check that none of
    /// them is in a shard.
    #[serde(default)]
    pub held_out: Option<HeldOut>,
}

/// The held-out set a prepared directory was kept apart from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOut {
    /// The held-out ShareGPT file.
    pub file: PathBuf,
    /// Its conversations: their ids with any ShareGPT part suffix `_<n>` removed, sorted. A
    /// record is left out when its id, so shortened, is one of these.
    pub conversations: Vec<String>,
    /// Records of the input left out for it.
    pub excluded: usize,
}

impl HeldOut {
    /// Reads the held-out file's conversations; every record must name its id, or a held-out
    /// conversation could be trained on unnoticed.
    pub fn read(file: &Path) -> Result<Self> {
        let (conversations, skipped) = read_conversations(file)
            .with_context(|| format!("reading the held-out conversations {}", file.display()))?;
        let mut ids = BTreeSet::new();
        let named = skipped
            .iter()
            .filter(|s| s.reason != SkipReason::LeadingAssistant)
            .map(|s| (s.id.as_deref(), s.to_string()));
        let kept = conversations
            .iter()
            .map(|c| (Some(c.id.as_str()), format!("record {} has no id", &c.id)));
        for (id, what) in named.chain(kept) {
            match id {
                Some(id) if !is_made_up_id(id) => ids.insert(conversation_of(id).0.to_string()),
                _ => bail!(
                    "held-out file {}: {what}: a held-out record without an id cannot be left \
                     out of the training data",
                    file.display()
                ),
            };
        }
        Ok(HeldOut {
            file: file.to_path_buf(),
            conversations: ids.into_iter().collect(),
            excluded: 0,
        })
    }

    /// Whether the record `id` belongs to a held-out conversation.
    pub fn holds(&self, id: &str) -> bool {
        self.conversations
            .binary_search_by(|c| c.as_str().cmp(conversation_of(id).0))
            .is_ok()
    }

    /// `conversations` without the held-out ones, counted in `excluded`.
    fn leave_out(&mut self, conversations: Vec<Conversation>) -> Vec<Conversation> {
        let before = conversations.len();
        let kept: Vec<Conversation> = conversations
            .into_iter()
            .filter(|c| !self.holds(&c.id))
            .collect();
        self.excluded = before - kept.len();
        kept
    }
}

// ----------------------------------------------------------------------------------------------
// prepare

/// The whole `prepare` step; returns the summary also saved in the manifest.
pub fn prepare(args: &PrepareOptions) -> Result<Summary> {
    // The library checks what the command line's parsers check, for callers that skip them.
    ensure!(
        (0.0..1.0).contains(&args.eval_fraction),
        "--eval-fraction must lie in [0, 1) (1 would leave nothing to train on), got {}",
        args.eval_fraction
    );
    ensure!(
        args.max_len >= 2,
        "--max-len must be at least 2 (one input and one target token), got {}",
        args.max_len
    );
    let chat = ChatTokenizer::from_model_dir(&args.model, Some(args.template.as_str()))?
        .with_system_prompt(!args.no_system_prompt);
    check_model_fits(&args.model, &chat, args.max_len)?;
    let (conversations, mut summary, mut skip_messages, held_out) = read_input(args)?;
    let encoded = tokenize_all(&chat, &conversations, args.max_len);
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (conversation, result) in conversations.iter().zip(encoded) {
        match result {
            Ok((sample, truncated)) => {
                summary.truncated += usize::from(truncated);
                summary.tokens += sample.input_ids.len();
                summary.assistant_tokens += sample.loss_mask.iter().filter(|&&m| m != 0).count();
                match split_of(&sample.id, args.seed, args.eval_fraction) {
                    Split::Train => train.push(sample),
                    Split::Eval => eval.push(sample),
                }
            }
            Err((reason, detail)) => {
                summary.count_skip(reason);
                let id = &conversation.id;
                let message = format!("skipped id {id}: {}: {detail}", reason.name());
                skip_messages.push((reason, message));
            }
        }
    }
    print_skips(&skip_messages);
    summary.train = train.len();
    summary.eval = eval.len();
    summary.kept = train.len() + eval.len();
    if summary.kept == 0 {
        bail!(
            "{}: no usable conversation\n{summary}",
            args.input.display()
        );
    }
    ensure!(
        !train.is_empty(),
        "{}: every kept conversation fell into the eval split (--eval-fraction {}): nothing to \
         train on",
        args.input.display(),
        args.eval_fraction
    );

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let train_shards = write_samples(&args.out, Split::Train, &train)?;
    let eval_shards = write_samples(&args.out, Split::Eval, &eval)?;
    let manifest = Manifest {
        source: args.input.clone(),
        template: args.template.as_str().to_string(),
        system_prompt: chat.system_prompt().map(str::to_string),
        model: args.model.clone(),
        max_len: args.max_len,
        eval_fraction: args.eval_fraction,
        seed: args.seed,
        vocab_size: chat.vocab_size(),
        train_shards,
        eval_shards,
        summary: summary.clone(),
        held_out,
    };
    let path = args.out.join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(summary)
}

/// The conversations to prepare (the held-out ones left out), the summary of the reading so far,
/// the skip messages, and the held-out set.
type Input = (
    Vec<Conversation>,
    Summary,
    Vec<(SkipReason, String)>,
    Option<HeldOut>,
);

fn read_input(args: &PrepareOptions) -> Result<Input> {
    let mut held_out = args.held_out.as_deref().map(HeldOut::read).transpose()?;
    let (conversations, notes) = read_conversations(&args.input)?;
    let mut summary = Summary {
        read: count_records(&conversations, &notes),
        ..Summary::default()
    };
    let conversations = match held_out.as_mut() {
        Some(held_out) => held_out.leave_out(conversations),
        None => conversations,
    };
    summary.held_out = held_out.as_ref().map_or(0, |h| h.excluded);
    let mut skip_messages = Vec::new();
    for note in &notes {
        if note.reason == SkipReason::LeadingAssistant {
            summary.dropped_first_assistant += 1;
        } else {
            summary.count_skip(note.reason);
            skip_messages.push((note.reason, format!("skipped {note}")));
        }
    }
    Ok((conversations, summary, skip_messages, held_out))
}

/// The first few skip messages: enough to see what is wrong without flooding the terminal. The
/// cut tail of a damaged file is always shown: it says where the file is broken.
fn print_skips(messages: &[(SkipReason, String)]) {
    const SHOWN: usize = 20;
    for (_, message) in messages.iter().take(SHOWN) {
        eprintln!("{message}");
    }
    if messages.len() > SHOWN {
        eprintln!(
            "... and {} more skipped records (counts in the summary)",
            messages.len() - SHOWN
        );
    }
    for (_, message) in messages
        .iter()
        .skip(SHOWN)
        .filter(|(reason, _)| *reason == SkipReason::CutOff)
    {
        eprintln!("{message}");
    }
}

/// Records = kept conversations + records skipped while reading (dropped messages aren't records).
fn count_records(conversations: &[Conversation], notes: &[Skipped]) -> usize {
    conversations.len()
        + notes
            .iter()
            .filter(|n| n.reason != SkipReason::LeadingAssistant)
            .count()
}

type Encoded = std::result::Result<(Sample, bool), (SkipReason, String)>;

/// Tokenizes in parallel, in input order; the bool says the sample was truncated.
fn tokenize_all(
    chat: &ChatTokenizer,
    conversations: &[Conversation],
    max_len: usize,
) -> Vec<Encoded> {
    let mut bar = Progress::new("prepare (conversations)", conversations.len() as u64);
    let encoded = conversations
        .par_iter()
        .map(|conversation| {
            let result = tokenize_one(chat, conversation, max_len);
            bar.inc(1);
            result
        })
        .collect();
    bar.finish();
    encoded
}

/// Over-long conversations are truncated to `max_len`, as the reference trainer does (spec
/// §2.1), rather than skipped: their first `max_len` tokens are still good training data. Only
/// as much of the conversation is rendered and tokenized as those tokens need.
fn tokenize_one(chat: &ChatTokenizer, conversation: &Conversation, max_len: usize) -> Encoded {
    let head = chat
        .encode_conversation_head(&conversation.messages, max_len)
        .map_err(|e| (SkipReason::TemplateError, format!("{e:#}")))?;
    if !head.mask.contains(&1) {
        return Err((
            SkipReason::NoAssistantTokens,
            format!("{} tokens, none from the assistant", head.ids.len()),
        ));
    }
    let sample = Sample {
        id: conversation.id.clone(),
        input_ids: head.ids,
        loss_mask: head.mask,
    };
    Ok((sample, head.truncated))
}

// ----------------------------------------------------------------------------------------------
// parquet shards
