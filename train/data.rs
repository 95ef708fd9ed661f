//! `clover data prepare`: ShareGPT conversations -> tokenized parquet shards with a loss mask
//! and a deterministic train/eval split; the shard reader the trainer and distiller use; and
//! `clover data import-chitchat`, which turns the chitchat-dataset package into ShareGPT form.

use crate::chat::{ChatTokenizer, Message, Role};
use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, Int32Builder, ListBuilder, RecordBatch, StringBuilder, UInt8Builder,
};
use arrow::datatypes::{DataType, Int32Type, UInt8Type};
use indicatif::{ProgressBar, ProgressStyle};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows per parquet shard.
pub const SHARD_ROWS: usize = 50_000;

#[derive(clap::Args, Debug, Clone)]
pub struct PrepareArgs {
    /// ShareGPT file: a JSON list, JSONL, or parquet with a `conversations` column.
    #[arg(long)]
    pub input: PathBuf,
    /// HF-style model dir (tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    pub model: PathBuf,
    /// vicuna | llama3 | chatml | auto (the model's own chat_template).
    #[arg(long, default_value = "auto", value_parser = ["vicuna", "llama3", "chatml", "auto"])]
    pub template: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Conversations longer than this many tokens are truncated to it (as the reference does).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    #[arg(long, default_value_t = 0.05)]
    pub eval_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ImportChitchatArgs {
    /// dataset.json of the PyPI package chitchat-dataset 0.9.0.
    #[arg(long)]
    pub input: PathBuf,
    /// ShareGPT JSON list to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    pub input_ids: Vec<i64>,
    pub loss_mask: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// Why a record was skipped. `LeadingAssistant` is the exception: only the conversation's first
/// message (from the assistant) was dropped, the record itself is kept (reference, spec §3).
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
        writeln!(f, "truncated to max-len: {}", self.truncated)?;
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
    pub model: PathBuf,
    pub max_len: usize,
    pub eval_fraction: f64,
    pub seed: u64,
    pub vocab_size: usize,
    pub train_shards: Vec<String>,
    pub eval_shards: Vec<String>,
    pub summary: Summary,
}

// ----------------------------------------------------------------------------------------------
// prepare

pub fn run_prepare(args: &PrepareArgs) -> Result<()> {
    let summary = prepare(args)?;
    println!("{summary}");
    println!("wrote {}", args.out.join("manifest.json").display());
    Ok(())
}

/// The whole `prepare` step; returns the summary also saved in the manifest.
pub fn prepare(args: &PrepareArgs) -> Result<Summary> {
    if !(0.0..=1.0).contains(&args.eval_fraction) {
        bail!(
            "--eval-fraction must lie in [0, 1], got {}",
            args.eval_fraction
        );
    }
    let chat = ChatTokenizer::from_model_dir(&args.model, Some(&args.template))?;
    let (conversations, notes) = read_conversations(&args.input)?;
    let mut summary = Summary {
        read: count_records(&conversations, &notes),
        ..Summary::default()
    };
    let mut skip_messages = Vec::new();
    for note in &notes {
        if note.reason == SkipReason::LeadingAssistant {
            summary.dropped_first_assistant += 1;
        } else {
            summary.count_skip(note.reason);
            skip_messages.push(format!("skipped {note}"));
        }
    }

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
                skip_messages.push(format!("skipped id {id}: {}: {detail}", reason.name()));
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

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let train_shards = write_samples(&args.out, Split::Train, &train)?;
    let eval_shards = write_samples(&args.out, Split::Eval, &eval)?;
    let manifest = Manifest {
        source: args.input.clone(),
        template: args.template.clone(),
        model: args.model.clone(),
        max_len: args.max_len,
        eval_fraction: args.eval_fraction,
        seed: args.seed,
        vocab_size: chat.vocab_size(),
        train_shards,
        eval_shards,
        summary: summary.clone(),
    };
    let path = args.out.join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(summary)
}

/// The first few skip messages: enough to see what is wrong without flooding the terminal.
fn print_skips(messages: &[String]) {
    const SHOWN: usize = 20;
    for message in messages.iter().take(SHOWN) {
        eprintln!("{message}");
    }
    if messages.len() > SHOWN {
        eprintln!(
            "... and {} more skipped records (counts in the summary)",
            messages.len() - SHOWN
        );
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
    let bar = ProgressBar::new(conversations.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("tokenizing {bar:40} {pos}/{len} [{elapsed_precise} < {eta}]")
            .expect("static progress template"),
    );
    let encoded = conversations
        .par_iter()
        .map(|conversation| {
            let result = tokenize_one(chat, conversation, max_len);
            bar.inc(1);
            result
        })
        .collect();
    bar.finish_and_clear();
    encoded
}

/// Over-long conversations are truncated to `max_len`, as the reference trainer does (spec
/// §2.1), rather than skipped: their first `max_len` tokens are still good training data.
fn tokenize_one(chat: &ChatTokenizer, conversation: &Conversation, max_len: usize) -> Encoded {
    let (mut input_ids, mut loss_mask) = chat
        .encode_conversation(&conversation.messages)
        .map_err(|e| (SkipReason::TemplateError, format!("{e:#}")))?;
    let truncated = input_ids.len() > max_len;
    input_ids.truncate(max_len);
    loss_mask.truncate(max_len);
    if !loss_mask.contains(&1) {
        return Err((
            SkipReason::NoAssistantTokens,
            format!("{} tokens, none from the assistant", input_ids.len()),
        ));
    }
    let sample = Sample {
        id: conversation.id.clone(),
        input_ids,
        loss_mask,
    };
    Ok((sample, truncated))
}

/// Deterministic split: a hash of (id, seed) mapped to [0, 1) below `eval_fraction` goes to eval.
pub fn split_of(id: &str, seed: u64, eval_fraction: f64) -> Split {
    let unit = (stable_hash(id.as_bytes(), seed) >> 11) as f64 / (1u64 << 53) as f64;
    if unit < eval_fraction {
        Split::Eval
    } else {
        Split::Train
    }
}

/// FNV-1a over the bytes, seeded, with a splitmix64 finalizer: stable across runs and platforms.
fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

// ----------------------------------------------------------------------------------------------
// parquet shards

fn shard_name(split: Split, index: usize) -> String {
    format!("{}-{index:05}.parquet", split.name())
}

fn shard_paths(dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let prefix = format!("{}-", split.name());
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(&prefix) && name.ends_with(".parquet") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Writes `samples` as `<split>-NNNNN.parquet` shards of at most SHARD_ROWS rows, replacing the
/// split's old shards. Returns the shard file names.
pub fn write_samples(dir: &Path, split: Split, samples: &[Sample]) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for old in shard_paths(dir, split)? {
        std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    let mut names = Vec::new();
    for (index, chunk) in samples.chunks(SHARD_ROWS).enumerate() {
        let name = shard_name(split, index);
        let path = dir.join(&name);
        write_shard(&path, chunk).with_context(|| format!("writing {}", path.display()))?;
        names.push(name);
    }
    Ok(names)
}

fn write_shard(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut ids = StringBuilder::new();
    let mut input_ids = ListBuilder::new(Int32Builder::new());
    let mut loss_mask = ListBuilder::new(UInt8Builder::new());
    let mut n_tokens = Int32Builder::new();
    for sample in samples {
        ids.append_value(&sample.id);
        for &id in &sample.input_ids {
            let id = i32::try_from(id)
                .map_err(|_| anyhow!("sample {}: token id {id} exceeds int32", sample.id))?;
            input_ids.values().append_value(id);
        }
        input_ids.append(true);
        loss_mask.values().append_slice(&sample.loss_mask);
        loss_mask.append(true);
        n_tokens.append_value(i32::try_from(sample.input_ids.len())?);
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(ids.finish())),
        ("input_ids", Arc::new(input_ids.finish())),
        ("loss_mask", Arc::new(loss_mask.finish())),
        ("n_tokens", Arc::new(n_tokens.finish())),
    ];
    let batch = RecordBatch::try_from_iter(columns)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path)?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

/// All samples of a split, shards in name order, rows in file order.
pub fn read_split(dir: &Path, split: Split) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for path in shard_paths(dir, split)? {
        read_shard(&path, &mut samples).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(samples)
}

fn read_shard(path: &Path, samples: &mut Vec<Sample>) -> Result<()> {
    let file = std::fs::File::open(path)?;
    for batch in ParquetRecordBatchReaderBuilder::try_new(file)?.build()? {
        let batch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| anyhow!("no column {name:?}"))
        };
        let ids = column("id")?
            .as_string_opt::<i32>()
            .ok_or_else(|| anyhow!("id is not utf8"))?;
        let input_ids = column("input_ids")?
            .as_list_opt::<i32>()
            .ok_or_else(|| anyhow!("input_ids is not a list"))?;
        let loss_mask = column("loss_mask")?
            .as_list_opt::<i32>()
            .ok_or_else(|| anyhow!("loss_mask is not a list"))?;
        for row in 0..batch.num_rows() {
            let tokens = input_ids.value(row);
            let tokens = tokens
                .as_primitive_opt::<Int32Type>()
                .ok_or_else(|| anyhow!("input_ids items are not int32"))?;
            let mask = loss_mask.value(row);
            let mask = mask
                .as_primitive_opt::<UInt8Type>()
                .ok_or_else(|| anyhow!("loss_mask items are not uint8"))?;
            if tokens.len() != mask.len() {
                bail!(
                    "row {row}: {} tokens but {} mask values",
                    tokens.len(),
                    mask.len()
                );
            }
            samples.push(Sample {
                id: ids.value(row).to_string(),
                input_ids: tokens.values().iter().map(|&t| i64::from(t)).collect(),
                loss_mask: mask.values().to_vec(),
            });
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// reading ShareGPT input

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
    // Reference behaviour (spec §3): a conversation that starts with the assistant loses that
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

#[derive(Deserialize)]
struct ChitchatConversation {
    messages: Vec<Vec<ChitchatMessage>>,
}

#[derive(Deserialize)]
struct ChitchatMessage {
    text: String,
    sender: String,
}

#[derive(Serialize)]
struct ShareGptRecord<'a> {
    id: &'a str,
    conversations: Vec<ShareGptMessage>,
}

#[derive(Serialize)]
struct ShareGptMessage {
    from: &'static str,
    value: String,
}

pub fn run_import_chitchat(args: &ImportChitchatArgs) -> Result<()> {
    let count = import_chitchat(&args.input, &args.out)?;
    println!("wrote {count} conversations to {}", args.out.display());
    Ok(())
}

/// Converts chitchat-dataset's `{id: {"messages": [[{text, sender, ..}, ..], ..], ..}}` into a
/// ShareGPT list: consecutive messages of one sender form one turn (joined with "\n"); the first
/// sender is "human", the other "gpt". Conversations are written in key order. Returns the count.
pub fn import_chitchat(input: &Path, out: &Path) -> Result<usize> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let dataset: BTreeMap<String, ChitchatConversation> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", input.display()))?;
    let records = dataset
        .iter()
        .map(|(id, conversation)| chitchat_record(id, conversation))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("converting {}", input.display()))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(out, serde_json::to_string(&records)?)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(records.len())
}

fn chitchat_record<'a>(
    id: &'a str,
    conversation: &ChitchatConversation,
) -> Result<ShareGptRecord<'a>> {
    let mut senders: Vec<&str> = Vec::new();
    let mut turns: Vec<(usize, Vec<&str>)> = Vec::new();
    for message in conversation.messages.iter().flatten() {
        let speaker = match senders.iter().position(|s| *s == message.sender) {
            Some(i) => i,
            None => {
                senders.push(&message.sender);
                senders.len() - 1
            }
        };
        if speaker > 1 {
            bail!("conversation {id}: more than two senders");
        }
        match turns.last_mut() {
            Some((last, texts)) if *last == speaker => texts.push(&message.text),
            _ => turns.push((speaker, vec![&message.text])),
        }
    }
    let conversations = turns
        .into_iter()
        .map(|(speaker, texts)| ShareGptMessage {
            from: if speaker == 0 { "human" } else { "gpt" },
            value: texts.join("\n"),
        })
        .collect();
    Ok(ShareGptRecord { id, conversations })
}
