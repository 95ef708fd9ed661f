//! File formats in and out: GGUF reading and import to an HF-style dir, chat templates, safetensors.

pub mod chat;
pub mod dequant;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod import;
pub mod safetensors;
pub mod token_head;
