//! clover: train and evaluate Clover-2 speculative-decoding draft heads with libtorch.
//!
//! The crate is six wings; each imports only the ones listed before it, so data flows one way:
//!
//! 1. [`formats`]: files in and out. GGUF reading and dequantisation, `import-gguf` to an
//!    HF-style model dir, chat templates (rendering with an assistant loss mask), safetensors.
//! 2. [`model`]: the LLaMA config and layers, the frozen [`model::teacher::Teacher`], the draft
//!    [`model::head::DraftHead`] (Clover-2, or the EAGLE-1 / Medusa-1 baselines of
//!    `docs/heads.md`) and its config, and the device/dtype policy.
//! 3. [`decode`]: sampling rules, plain generation, static trees, tree-attention speculative
//!    decoding with a draft head, and `eval` (tau and speed on held-out prompts).
//! 4. [`data`]: ShareGPT input -> conversations -> tokenized parquet shards (`prepare`), the chitchat
//!    import, and self-distillation (`regenerate`, which answers with `decode`).
//! 5. [`training`]: distillation targets (the teacher's cached states), the training config,
//!    batches, the per-depth loss, AdamW and schedule, checkpoints, metrics, held-out evaluation,
//!    the trainer loop, `export` of a checkpoint as the reference's safetensors layout, and
//!    `report` (eval reports as a table and PNG plots).
//! 6. [`cli`]: the `clover` command line on top: parses options and hands them to the wings.
//!
//! Leaves every wing may use: [`checks`] (valid ranges of settings), [`progress`] (bars on a
//! terminal, plain lines in a log), [`rng`] (seeded, exclusive draws from libtorch's generator),
//! [`native`] (C++ shims into libtorch), [`outputs`] (what a command may write over: never its
//! inputs, never files it did not write) and [`distributed`] (torchrun/Slurm launches and c10d
//! process groups for data-parallel runs).
//!
//! A training step: `data::shards` (samples) -> `training::targets` (cached states, offline) or
//! `model::teacher` (online) -> `training::batches` -> `model::head` -> `training::loss` ->
//! `training::optimizer` -> `training::checkpoint`. The design, with shapes and the places where
//! clover knowingly differs from the reference implementation, is written in `docs/clover2.md`.

pub mod checks;
pub mod cli;
pub mod data;
pub mod decode;
pub mod distributed;
pub mod formats;
pub mod model;
pub mod native;
pub mod outputs;
pub mod progress;
pub mod rng;
pub mod training;
