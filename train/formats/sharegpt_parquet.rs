//! ShareGPT as parquet: a `conversations` column holding either a JSON string or a
//! list<struct{from,value}> / list<struct{role,content}>, and an optional `id` column. Rows come
//! back one at a time as the JSON record they stand for (`{"id", "conversations"}`), read one
//! record batch at a time. Arrow validates UTF-8 per column chunk, so invalid UTF-8 here fails
//! the whole file instead of one record.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde_json::Value;

/// The rows of a ShareGPT parquet file, in order.
pub struct ParquetConversations {
    batches: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    row_in_batch: usize,
    rows_read: u64,
    total_rows: u64,
}

impl ParquetConversations {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let total_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        Ok(ParquetConversations {
            batches: builder.build()?,
            batch: None,
            row_in_batch: 0,
            rows_read: 0,
            total_rows,
        })
    }

    pub fn rows_read(&self) -> u64 {
        self.rows_read
    }

    pub fn total_rows(&self) -> u64 {
        self.total_rows
    }

    /// The next row as (its 0-based index, its JSON record), or None after the last.
    fn next_row(&mut self) -> Result<Option<(u64, Value)>> {
        loop {
            if let Some(batch) = self
                .batch
                .as_ref()
                .filter(|b| self.row_in_batch < b.num_rows())
            {
                let record = row_record(batch, self.row_in_batch)?;
                self.row_in_batch += 1;
                self.rows_read += 1;
                return Ok(Some((self.rows_read - 1, record)));
            }
            match self.batches.next() {
                Some(batch) => {
                    self.batch = Some(batch?);
                    self.row_in_batch = 0;
                }
                None => return Ok(None),
            }
        }
    }
}

impl Iterator for ParquetConversations {
    type Item = Result<(u64, Value)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_row().transpose()
    }
}

fn row_record(batch: &RecordBatch, row: usize) -> Result<Value> {
    let conversations = batch
        .column_by_name("conversations")
        .ok_or_else(|| anyhow!("no column \"conversations\""))?;
    let mut record = serde_json::Map::new();
    if let Some(ids) = batch.column_by_name("id").filter(|ids| ids.is_valid(row)) {
        record.insert("id".into(), Value::String(string_at(ids.as_ref(), row)?));
    }
    record.insert(
        "conversations".into(),
        conversation_cell(conversations.as_ref(), row)?,
    );
    Ok(Value::Object(record))
}

fn string_at(array: &dyn Array, row: usize) -> Result<String> {
    match array.data_type() {
        DataType::Utf8 => Ok(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Ok(array.as_string::<i64>().value(row).to_string()),
        DataType::Int64 => Ok(array.as_primitive::<Int64Type>().value(row).to_string()),
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
