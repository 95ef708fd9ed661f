//! Conversation data: ShareGPT input, chat rendering into tokenized shards, the chitchat and
//! ShareGPT imports, self-distillation (regenerate), the held-out evaluation tasks, draft
//! vocabularies by token frequency, seeded splits, and the file helpers of resumable jobs.

pub mod chitchat;
pub mod jobfiles;
pub mod model_fit;
pub mod prepare;
pub mod regenerate;
pub mod shards;
pub mod sharegpt;
pub mod sharegpt_import;
pub mod split;
pub mod tasks;
pub mod vocab;
