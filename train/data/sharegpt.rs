//! ShareGPT input (JSON list, JSONL or parquet) to conversations, streamed record by record;
//! every bad record is skipped and reported with its file position, id and reason.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::formats::chat::{Message, Role};
use crate::formats::json_records::{Item, JsonRecords, Layout, Position, MAX_RECORD_BYTES};
use crate::formats::sharegpt_parquet::ParquetConversations;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    pub messages: Vec<Message>,
}

/// The conversation a record belongs to and its part number: ShareGPT's split release cuts long
/// conversations into parts with ids `<conversation>_<n>`, part n starting at message n. An id
/// without such a suffix is a whole conversation, part 0.
pub fn conversation_of(id: &str) -> (&str, u64) {
    match id.rsplit_once('_') {
        Some((base, part)) if !base.is_empty() && !part.is_empty() => match part.parse() {
            Ok(n) if part.bytes().all(|b| b.is_ascii_digit()) => (base, n),
            _ => (id, 0),
        },
        _ => (id, 0),
    }
}

#[derive(Serialize)]
struct Line<'a> {
    id: &'a str,
    conversations: Vec<Turn<'a>>,
}

#[derive(Serialize)]
struct Turn<'a> {
    from: &'static str,
    value: &'a str,
}

/// One ShareGPT JSONL line: {"id", "conversations": [{"from", "value"}]}.
pub fn sharegpt_line(id: &str, messages: &[Message]) -> Result<String> {
    let conversations = messages
        .iter()
        .map(|m| Turn {
            from: match m.role {
                Role::System => "system",
                Role::User => "human",
                Role::Assistant => "gpt",
            },
            value: &m.content,
        })
        .collect();
    Ok(serde_json::to_string(&Line { id, conversations })? + "\n")
}

/// The start of the id the reader gives a record without one (`#<index>`).
const MADE_UP_ID: &str = "#";

/// Whether `id` is one the reader made up for a record without an id: such a record cannot be
/// recognised in another file.
pub fn is_made_up_id(id: &str) -> bool {
    id.starts_with(MADE_UP_ID)
}

/// Why a record was skipped. `LeadingAssistant` is the exception: only the conversation's first
/// message (from the assistant) was dropped, the record itself is kept (reference, docs/clover2.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    Malformed,
    UnknownRole,
    EmptyConversation,
    LeadingAssistant,
    InvalidUtf8,
    DuplicateId,
    TemplateError,
    NoAssistantTokens,
    /// The file ends inside the record (a truncated or damaged JSON list).
    CutOff,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::Malformed => "malformed record",
            SkipReason::UnknownRole => "unknown role",
            SkipReason::EmptyConversation => "empty conversation",
            SkipReason::LeadingAssistant => "first message from the assistant (message dropped)",
            SkipReason::InvalidUtf8 => "invalid UTF-8",
            SkipReason::DuplicateId => "duplicate id",
            SkipReason::TemplateError => "template error",
            SkipReason::NoAssistantTokens => "no assistant tokens",
            SkipReason::CutOff => "cut off by the end of the file",
        }
    }
}

/// A skipped record (or dropped message): where it is, its id if known, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub position: String,
    pub id: Option<String>,
    pub reason: SkipReason,
    pub detail: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.position)?;
        if let Some(id) = &self.id {
            write!(f, " (id {id})")?;
        }
        write!(f, ": {}: {}", self.reason.name(), self.detail)
    }
}

/// Reads a ShareGPT JSON list, JSONL or parquet file whole (see [`open_conversations`], which
/// streams it). Bad records are returned as `Skipped`, a truncated or damaged JSON list keeps
/// every whole record before the damage and returns the cut tail as one `Skipped`; a file that
/// cannot be read at all, or holds no readable record, is an error naming the file.
pub fn read_conversations(path: &Path) -> Result<(Vec<Conversation>, Vec<Skipped>)> {
    let mut conversations = Vec::new();
    let mut skipped = Vec::new();
    for entry in open_conversations(path)? {
        match entry? {
            Entry::Conversation(conversation) => conversations.push(conversation),
            Entry::Skipped(skip) => skipped.push(skip),
        }
    }
    refuse_unreadable(path, conversations.len(), &skipped)?;
    Ok((conversations, skipped))
}

/// Every record broken (e.g. a pretty-printed object read as JSONL) is an unreadable file rather
/// than many bad records.
pub fn refuse_unreadable(path: &Path, kept: usize, skipped: &[Skipped]) -> Result<()> {
    let broken = |s: &Skipped| matches!(s.reason, SkipReason::Malformed | SkipReason::CutOff);
    if kept == 0 && !skipped.is_empty() && skipped.iter().all(broken) {
        bail!(
            "{}: no record could be read; the first: {}",
            path.display(),
            skipped[0]
        );
    }
    Ok(())
}

/// What a reader skipped, for a command's log: the records skipped by reason, the messages
/// dropped, and the first few skips in full (the cut tail of a damaged file always among them).
/// None when nothing was skipped.
pub fn skip_report(path: &Path, skipped: &[Skipped]) -> Option<String> {
    const SHOWN: usize = 3;
    let mut counts = std::collections::BTreeMap::new();
    for skip in skipped {
        *counts.entry(skip.reason).or_insert(0usize) += 1;
    }
    let dropped = counts.remove(&SkipReason::LeadingAssistant).unwrap_or(0);
    let records: usize = counts.values().sum();
    if records + dropped == 0 {
        return None;
    }
    let by_reason: Vec<String> = counts
        .iter()
        .map(|(reason, n)| format!("{}: {n}", reason.name()))
        .collect();
    let mut report =
        format!(
        "{}: skipped {records} records ({}); first message from the assistant dropped in {dropped}",
        path.display(),
        if by_reason.is_empty() { "none".to_string() } else { by_reason.join(", ") }
    );
    let bad = skipped
        .iter()
        .filter(|s| s.reason != SkipReason::LeadingAssistant);
    let mut shown: Vec<&Skipped> = bad.clone().take(SHOWN).collect();
    shown.extend(bad.skip(SHOWN).filter(|s| s.reason == SkipReason::CutOff));
    for skip in shown {
        report += &format!("\n  skipped {skip}");
    }
    Some(report)
}

/// One step of a [`ConversationStream`]: a conversation, or a record skipped (or a message
/// dropped: `LeadingAssistant`, which comes just before its conversation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Conversation(Conversation),
    Skipped(Skipped),
}

/// The conversations of a ShareGPT file, one record at a time: memory holds the record being
/// read (and the ids seen, to refuse duplicates), never the file.
pub struct ConversationStream {
    path: PathBuf,
    source: Box<dyn RecordSource>,
    seen: HashSet<String>,
    index: usize,
    queue: VecDeque<Entry>,
    /// After an error nothing more is read.
    failed: bool,
}

/// Opens a ShareGPT JSON list, JSONL or parquet file (by the `.parquet` extension, else by its
/// first byte) for reading record by record.
pub fn open_conversations(path: &Path) -> Result<ConversationStream> {
    let is_parquet = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let source: Box<dyn RecordSource> = if is_parquet {
        let rows = ParquetConversations::open(path)
            .with_context(|| format!("reading parquet {}", path.display()))?;
        Box::new(ParquetSource { rows })
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut records = JsonRecords::new(BufReader::with_capacity(1 << 20, file));
        let layout = records
            .layout()
            .with_context(|| format!("reading {}", path.display()))?;
        Box::new(JsonSource {
            records,
            layout,
            size,
        })
    };
    Ok(ConversationStream {
        path: path.to_path_buf(),
        source,
        seen: HashSet::new(),
        index: 0,
        queue: VecDeque::new(),
        failed: false,
    })
}

impl ConversationStream {
    /// (done, total) in the source's units: bytes of a JSON file, rows of a parquet file.
    pub fn progress(&self) -> (u64, u64) {
        self.source.progress()
    }

    fn read_next(&mut self) -> Result<Option<Entry>> {
        loop {
            if let Some(entry) = self.queue.pop_front() {
                return Ok(Some(entry));
            }
            let Some(record) = self.source.next_record()? else {
                return Ok(None);
            };
            let index = self.index;
            self.index += 1;
            let position = record.position.clone();
            let mut notes = Vec::new();
            let entry = match conversation_from_record(record, index, &mut notes) {
                Ok(conversation) if !self.seen.insert(conversation.id.clone()) => {
                    notes.clear();
                    Entry::Skipped(Skipped {
                        position,
                        id: Some(conversation.id),
                        reason: SkipReason::DuplicateId,
                        detail: "an earlier record has the same id".into(),
                    })
                }
                Ok(conversation) => Entry::Conversation(conversation),
                Err(skip) => Entry::Skipped(skip),
            };
            self.queue.extend(notes.into_iter().map(Entry::Skipped));
            self.queue.push_back(entry);
        }
    }
}

impl Iterator for ConversationStream {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.read_next();
        self.failed = next.is_err();
        next.with_context(|| format!("reading {}", self.path.display()))
            .transpose()
    }
}

/// One input record before validation: where it was and its bytes or parsed value.
struct RawRecord {
    position: String,
    content: RawContent,
}

enum RawContent {
    Bytes(Vec<u8>),
    Json(Value),
    /// A record the reader could not deliver (the cut tail of a file, say), with why.
    Bad(SkipReason, String),
}

/// Where records come from: a JSON list or JSONL file, or a parquet file.
trait RecordSource {
    fn next_record(&mut self) -> Result<Option<RawRecord>>;
    /// (done, total) in the source's own units.
    fn progress(&self) -> (u64, u64);
}

struct JsonSource {
    records: JsonRecords<BufReader<std::fs::File>>,
    layout: Layout,
    size: u64,
}

impl RecordSource for JsonSource {
    fn next_record(&mut self) -> Result<Option<RawRecord>> {
        let Some(item) = self.records.next().transpose()? else {
            return Ok(None);
        };
        Ok(Some(json_record(item, self.layout)))
    }

    fn progress(&self) -> (u64, u64) {
        (self.records.bytes_read(), self.size)
    }
}

/// A JSON list record is named by its index, line and column; a JSONL record by its line. The
/// places where the file is damaged carry the byte offset as well.
fn json_record(item: Item, layout: Layout) -> RawRecord {
    let name = |at: &Position| match layout {
        Layout::Array => format!(
            "record {} (line {}, column {})",
            at.index, at.line, at.column
        ),
        Layout::Lines => format!("line {}", at.line),
    };
    let (position, content) = match item {
        Item::Record { at, bytes } => (name(&at), RawContent::Bytes(bytes)),
        Item::Oversized { at, len } => (
            format!("{}, byte {}", name(&at), at.byte),
            RawContent::Bad(
                SkipReason::Malformed,
                format!(
                    "{len} bytes, more than the {} MiB one record may have (a bracket or \
                     quote that never closes?)",
                    MAX_RECORD_BYTES >> 20
                ),
            ),
        ),
        Item::CutOff { at, end } if at.byte == end => (
            format!(
                "end of file (line {}, column {}, byte {end})",
                at.line, at.column
            ),
            RawContent::Bad(
                SkipReason::CutOff,
                format!(
                    "the JSON list has no closing ']' (the file is truncated after {} records?)",
                    at.index
                ),
            ),
        ),
        Item::CutOff { at, end } => (
            format!("{}, byte {}", name(&at), at.byte),
            RawContent::Bad(
                SkipReason::CutOff,
                format!(
                    "the file ends at byte {end} inside this record ({} bytes of it; the file \
                     is truncated, or a bracket or quote never closes); the {} records before \
                     it are read",
                    end - at.byte,
                    at.index
                ),
            ),
        ),
        Item::Trailing { at } => (
            format!(
                "after the list (line {}, column {}, byte {})",
                at.line, at.column, at.byte
            ),
            RawContent::Bad(
                SkipReason::Malformed,
                "data after the JSON list's closing ']' (ignored)".into(),
            ),
        ),
    };
    RawRecord { position, content }
}

struct ParquetSource {
    rows: ParquetConversations,
}

impl RecordSource for ParquetSource {
    fn next_record(&mut self) -> Result<Option<RawRecord>> {
        let Some((row, value)) = self.rows.next().transpose()? else {
            return Ok(None);
        };
        Ok(Some(RawRecord {
            position: format!("row {row}"),
            content: RawContent::Json(value),
        }))
    }

    fn progress(&self) -> (u64, u64) {
        (self.rows.rows_read(), self.rows.total_rows())
    }
}

/// Validates one record. `LeadingAssistant` notes go to `notes`; a bad record is returned as Err.
fn conversation_from_record(
    record: RawRecord,
    index: usize,
    notes: &mut Vec<Skipped>,
) -> std::result::Result<Conversation, Skipped> {
    let position = record.position;
    let skip = |id: Option<String>, reason: SkipReason, detail: String| Skipped {
        position: position.clone(),
        id,
        reason,
        detail,
    };
    let value = match record.content {
        RawContent::Json(value) => value,
        RawContent::Bad(reason, detail) => return Err(skip(None, reason, detail)),
        RawContent::Bytes(bytes) => {
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                skip(
                    None,
                    SkipReason::InvalidUtf8,
                    format!("bad byte at offset {} of the record", e.valid_up_to()),
                )
            })?;
            serde_json::from_str(text)
                .map_err(|e| skip(None, SkipReason::Malformed, format!("bad JSON: {e}")))?
        }
    };
    let object = value.as_object().ok_or_else(|| {
        skip(
            None,
            SkipReason::Malformed,
            "the record is not a JSON object".into(),
        )
    })?;
    let id = match object.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        // Without an id the record's index names it, so it stays unique and deterministic.
        None | Some(Value::Null) => format!("{MADE_UP_ID}{index}"),
        Some(other) => {
            return Err(skip(
                None,
                SkipReason::Malformed,
                format!("id is not a string: {other}"),
            ))
        }
    };
    let list = object
        .get("conversations")
        .or_else(|| object.get("messages"))
        .ok_or_else(|| {
            skip(
                Some(id.clone()),
                SkipReason::Malformed,
                "no \"conversations\" or \"messages\" field".into(),
            )
        })?;
    let list = list.as_array().ok_or_else(|| {
        skip(
            Some(id.clone()),
            SkipReason::Malformed,
            "\"conversations\" is not a list".into(),
        )
    })?;
    let mut messages = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        messages.push(parse_message(item).map_err(|(reason, detail)| {
            skip(Some(id.clone()), reason, format!("message {i}: {detail}"))
        })?);
    }
    // Reference behaviour (docs/clover2.md §3): a conversation that starts with the assistant loses that
    // first message.
    if messages.first().is_some_and(|m| m.role == Role::Assistant) {
        messages.remove(0);
        notes.push(skip(
            Some(id.clone()),
            SkipReason::LeadingAssistant,
            "dropped message 0".into(),
        ));
    }
    if messages.is_empty() {
        return Err(skip(
            Some(id),
            SkipReason::EmptyConversation,
            "no messages".into(),
        ));
    }
    Ok(Conversation { id, messages })
}

/// `{"from","value"}` (human/gpt/system) or `{"role","content"}` (user/assistant/system).
fn parse_message(item: &Value) -> std::result::Result<Message, (SkipReason, String)> {
    let object = item
        .as_object()
        .ok_or_else(|| (SkipReason::Malformed, "not a JSON object".to_string()))?;
    let (role, content) = match (object.get("from"), object.get("role")) {
        (Some(from), _) => (from, object.get("value")),
        (None, Some(role)) => (role, object.get("content")),
        (None, None) => {
            return Err((
                SkipReason::Malformed,
                "no \"from\" or \"role\" field".into(),
            ))
        }
    };
    let role_name = role.as_str().ok_or_else(|| {
        (
            SkipReason::Malformed,
            format!("role is not a string: {role}"),
        )
    })?;
    let role = Role::parse(role_name).ok_or_else(|| {
        (
            SkipReason::UnknownRole,
            format!("role {role_name:?} (expected human/gpt/system or user/assistant/system)"),
        )
    })?;
    let content = content.and_then(Value::as_str).ok_or_else(|| {
        (
            SkipReason::Malformed,
            "no string \"value\"/\"content\"".to_string(),
        )
    })?;
    Ok(Message::new(role, content))
}
