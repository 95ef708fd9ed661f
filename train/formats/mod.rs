//! File formats in and out: GGUF reading and import to an HF-style dir, chat templates, safetensors,
//! and the record readers of external data files (JSON arrays and JSON Lines streamed record by
//! record, ShareGPT parquet).

pub mod chat;
pub mod dequant;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod import;
pub mod json_records;
pub mod safetensors;
pub mod sharegpt_parquet;
pub mod token_head;
