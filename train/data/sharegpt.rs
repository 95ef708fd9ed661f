//! ShareGPT input (JSON list, JSONL or parquet) to conversations; every bad record is skipped
//! and reported with its file position, id and reason.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

use crate::formats::chat::{Message, Role};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    pub messages: Vec<Message>,
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

/// Reads a ShareGPT JSON list, JSONL or parquet file. Bad records are returned as `Skipped`;
/// a file that cannot be read or parsed as a whole (e.g. a truncated JSON list) is an error
/// naming the file and the position.
pub fn read_conversations(path: &Path) -> Result<(Vec<Conversation>, Vec<Skipped>)> {
    let is_parquet = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let records = if is_parquet {
        parquet_records(path).with_context(|| format!("reading parquet {}", path.display()))?
    } else {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        json_records(&bytes).with_context(|| format!("reading {}", path.display()))?
    };
    let mut conversations = Vec::new();
    let mut skipped = Vec::new();
    let mut seen = HashSet::new();
    for (index, record) in records.into_iter().enumerate() {
        match conversation_from_record(record, index, &mut skipped) {
            Ok(conversation) if !seen.insert(conversation.id.clone()) => skipped.push(Skipped {
                position: format!("record {index}"),
                id: Some(conversation.id.clone()),
                reason: SkipReason::DuplicateId,
                detail: "an earlier record has the same id".into(),
            }),
            Ok(conversation) => conversations.push(conversation),
            Err(skip) => skipped.push(skip),
        }
    }
    if conversations.is_empty()
        && !skipped.is_empty()
        && skipped.iter().all(|s| s.reason == SkipReason::Malformed)
    {
        // Every record is broken: the file is not ShareGPT at all (e.g. a pretty-printed object
        // read as JSONL), which is an unreadable file rather than many bad records.
        bail!(
            "{}: no record could be read; the first: {}",
            path.display(),
            skipped[0]
        );
    }
    Ok((conversations, skipped))
}

/// One input record before validation: where it was and its bytes or parsed value.
struct RawRecord {
    position: String,
    content: RawContent,
}

enum RawContent {
    Bytes(Vec<u8>),
    Json(Value),
}

/// A JSON list is split into its elements by a byte scanner, so that a record with invalid UTF-8
/// or bad JSON costs that record only; anything else is JSONL (one record per line).
fn json_records(bytes: &[u8]) -> Result<Vec<RawRecord>> {
    let first = bytes.iter().position(|b| !b.is_ascii_whitespace());
    match first.map(|i| bytes[i]) {
        Some(b'[') => split_json_list(bytes, first.unwrap_or(0)),
        _ => Ok(jsonl_records(bytes)),
    }
}

fn jsonl_records(bytes: &[u8]) -> Vec<RawRecord> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| line.iter().any(|b| !b.is_ascii_whitespace()))
        .map(|(i, line)| RawRecord {
            position: format!("line {}", i + 1),
            content: RawContent::Bytes(line.to_vec()),
        })
        .collect()
}

/// Splits a top-level JSON array into element byte ranges, tracking strings and nesting, and
/// lines incrementally so that positions cost nothing extra on large files.
fn split_json_list(bytes: &[u8], open: usize) -> Result<Vec<RawRecord>> {
    let mut records = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let (mut line, _) = line_column(bytes, open);
    let mut line_start = bytes[..open]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let mut start = open + 1;
    // Line and column of the current element's first byte.
    let mut element_at: Option<(usize, usize)> = None;
    let push =
        |from: usize, to: usize, at: Option<(usize, usize)>, records: &mut Vec<RawRecord>| {
            if let Some((line, column)) = at {
                records.push(RawRecord {
                    position: format!("record {} (line {line}, column {column})", records.len()),
                    content: RawContent::Bytes(bytes[from..to].to_vec()),
                });
            }
        };
    for (i, &b) in bytes.iter().enumerate().skip(open + 1) {
        if b == b'\n' {
            line += 1;
            line_start = i + 1;
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if element_at.is_none()
            && !b.is_ascii_whitespace()
            && !(depth == 0 && matches!(b, b',' | b']'))
        {
            element_at = Some((line, i - line_start + 1));
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' if depth > 0 => depth -= 1,
            b',' if depth == 0 => {
                push(start, i, element_at.take(), &mut records);
                start = i + 1;
            }
            b']' => {
                push(start, i, element_at.take(), &mut records);
                let trailing = &bytes[i + 1..];
                if let Some(extra) = trailing.iter().position(|b| !b.is_ascii_whitespace()) {
                    let at = i + 1 + extra;
                    let (line, column) = line_column(bytes, at);
                    bail!("unexpected data after the JSON list at byte {at} (line {line}, column {column})");
                }
                return Ok(records);
            }
            b'}' => bail!(
                "unbalanced '}}' at byte {i} (line {line}, column {})",
                i - line_start + 1
            ),
            _ => {}
        }
    }
    let (start_line, _) = element_at.unwrap_or((line, 0));
    bail!(
        "truncated JSON list: the file ends at byte {} (line {line}, column {}) inside record {} \
         which starts on line {start_line}",
        bytes.len(),
        bytes.len() - line_start + 1,
        records.len()
    )
}

/// 1-based line and column (in bytes) of a byte offset.
fn line_column(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = offset
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    (line, column)
}

/// Parquet input: a `conversations` column holding either a JSON string or a
/// list<struct{from,value}> / list<struct{role,content}>, and an optional `id` column.
/// Arrow validates UTF-8 per column chunk, so invalid UTF-8 here fails the whole file (with the
/// file named) instead of one record.
fn parquet_records(path: &Path) -> Result<Vec<RawRecord>> {
    let file = std::fs::File::open(path)?;
    let mut records = Vec::new();
    for batch in ParquetRecordBatchReaderBuilder::try_new(file)?.build()? {
        let batch = batch?;
        let conversations = batch
            .column_by_name("conversations")
            .ok_or_else(|| anyhow!("no column \"conversations\""))?;
        let ids = batch.column_by_name("id");
        for row in 0..batch.num_rows() {
            let position = format!("row {}", records.len());
            let mut record = serde_json::Map::new();
            if let Some(ids) = ids.filter(|ids| ids.is_valid(row)) {
                record.insert("id".into(), Value::String(string_at(ids.as_ref(), row)?));
            }
            record.insert(
                "conversations".into(),
                conversation_cell(conversations.as_ref(), row)?,
            );
            records.push(RawRecord {
                position,
                content: RawContent::Json(Value::Object(record)),
            });
        }
    }
    Ok(records)
}

fn string_at(array: &dyn Array, row: usize) -> Result<String> {
    match array.data_type() {
        DataType::Utf8 => Ok(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Ok(array.as_string::<i64>().value(row).to_string()),
        DataType::Int64 => Ok(array
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(row)
            .to_string()),
        DataType::Int32 => Ok(array.as_primitive::<Int32Type>().value(row).to_string()),
        other => bail!("unsupported column type {other} (expected a string)"),
    }
}

/// The conversation cell as JSON; a JSON-string cell that does not parse becomes a string value,
/// which the record check then reports as malformed.
fn conversation_cell(array: &dyn Array, row: usize) -> Result<Value> {
    if array.is_null(row) {
        return Ok(Value::Null);
    }
    let messages = match array.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 => {
            let text = string_at(array, row)?;
            return Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)));
        }
        DataType::List(_) => array.as_list::<i32>().value(row),
        DataType::LargeList(_) => array.as_list::<i64>().value(row),
        other => bail!("column \"conversations\" has unsupported type {other}"),
    };
    let messages = messages
        .as_struct_opt()
        .ok_or_else(|| anyhow!("\"conversations\" items are not structs"))?;
    let mut out = Vec::with_capacity(messages.len());
    for i in 0..messages.len() {
        let mut message = serde_json::Map::new();
        for (field, column) in messages.fields().iter().zip(messages.columns()) {
            if column.is_valid(i) {
                message.insert(
                    field.name().clone(),
                    Value::String(string_at(column.as_ref(), i)?),
                );
            }
        }
        out.push(Value::Object(message));
    }
    Ok(Value::Array(out))
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
        None | Some(Value::Null) => format!("#{index}"),
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

// ----------------------------------------------------------------------------------------------
// chitchat-dataset import
