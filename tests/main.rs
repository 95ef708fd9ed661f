//! Integration tests: real libtorch, real fixtures, and the real SmolLM2 teacher where it matters.
//! One module per area.

mod chat;
mod clients;
mod common;
mod data;
mod device;
mod distributed;
mod draft_vocab;
mod eagle3;
mod eval;
mod generate;
mod gguf;
mod head;
mod heads;
mod hostile;
mod hostile_files;
mod hostile_outputs;
mod hostile_prepare;
mod loss;
mod losses;
mod native;
mod random;
mod regenerate;
mod sharegpt;
mod sharegpt_import;
mod speculative;
mod targets;
mod tasks;
mod tau_estimate;
mod teacher;
mod trainer;
mod tree;
