//! Training the draft head: distillation targets (cache), config, batches, loss, optimizer,
//! checkpoints, metrics, held-out evaluation and its tau estimate, the trainer loop, export and
//! the training benchmark.

pub mod batches;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod distill_loss;
pub mod evaluate;
pub mod export;
pub mod export_speculators;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod report;
pub mod run_dir;
pub mod targets;
pub mod tau_estimate;
pub mod teacher_path;
pub mod trainer;
