//! clover: train and evaluate Clover-2 speculative-decoding draft heads with libtorch.
//!
//! Data flows one way through the modules: `gguf` + `import` (bring a model in) → `chat` / `data`
//! (conversations to tokenized parquet; `regenerate` for self-distillation) → `targets` (teacher
//! states) → `head` + `trainer` (the draft head) → `export` → `tree` + `speculative` → `eval`.
//! `teacher` is the frozen model every stage runs; `generate` is its plain decoding.

pub mod bench;
pub mod chat;
pub mod cli;
pub mod data;
pub mod eval;
pub mod export;
pub mod files;
pub mod generate;
pub mod gguf;
pub mod head;
pub mod import;
pub mod loss;
pub mod regenerate;
pub mod speculative;
pub mod targets;
pub mod teacher;
pub mod trainer;
pub mod tree;
