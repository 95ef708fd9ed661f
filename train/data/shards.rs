//! Tokenized samples on disk: parquet shards per split, written by `prepare` and read by the
//! distiller and the trainer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, Int32Builder, ListArray, ListBuilder, RecordBatch, StringBuilder,
    UInt8Builder,
};
use arrow::datatypes::{Int32Type, UInt8Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

/// Rows per parquet shard.
pub const SHARD_ROWS: usize = 50_000;

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
    // Rows are numbered from the file's start, over all its record batches.
    let mut first_row = 0;
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
            let at = first_row + row;
            let id = match ids.is_null(row) {
                true => bail!("row {at}: column id is null"),
                false => ids.value(row),
            };
            let tokens = list_without_nulls(input_ids, row, "input_ids")
                .with_context(|| format!("row {at} (sample {id:?})"))?;
            let tokens = tokens
                .as_primitive_opt::<Int32Type>()
                .ok_or_else(|| anyhow!("input_ids items are not int32"))?;
            let mask = list_without_nulls(loss_mask, row, "loss_mask")
                .with_context(|| format!("row {at} (sample {id:?})"))?;
            let mask = mask
                .as_primitive_opt::<UInt8Type>()
                .ok_or_else(|| anyhow!("loss_mask items are not uint8"))?;
            if tokens.len() != mask.len() {
                bail!(
                    "row {at} (sample {id:?}): {} tokens but {} mask values",
                    tokens.len(),
                    mask.len()
                );
            }
            samples.push(Sample {
                id: id.to_string(),
                input_ids: tokens.values().iter().map(|&t| i64::from(t)).collect(),
                loss_mask: mask.values().to_vec(),
            });
        }
        first_row += batch.num_rows();
    }
    Ok(())
}

/// Row `row` of a list column, refused when the list or any item in it is null: arrow keeps a
/// value under every null slot, which would otherwise be read as real data.
fn list_without_nulls(column: &ListArray, row: usize, name: &str) -> Result<ArrayRef> {
    if column.is_null(row) {
        bail!("column {name} is null");
    }
    let items = column.value(row);
    if let Some(at) = (0..items.len()).find(|&i| items.is_null(i)) {
        bail!("column {name} holds a null at position {at}");
    }
    Ok(items)
}

// ----------------------------------------------------------------------------------------------
// reading ShareGPT input
