//! Conversation data: ShareGPT input, chat rendering into tokenized shards, the chitchat import,
//! self-distillation (regenerate), draft vocabularies by token frequency, and the file helpers of
//! resumable jobs.

pub mod chitchat;
pub mod jobfiles;
pub mod model_fit;
pub mod prepare;
pub mod regenerate;
pub mod shards;
pub mod sharegpt;
pub mod sharegpt_import;
pub mod split;
pub mod vocab;
