//! The models: LLaMA config and layers, the frozen teacher, the draft heads (Clover-2, and the
//! EAGLE-1 and Medusa-1 baselines on the same `DraftHead`), device policy.

pub mod config;
pub mod device;
pub mod draft_vocab;
pub mod eagle;
pub mod head;
pub mod head_config;
pub mod layers;
pub mod medusa;
pub mod random;
pub mod teacher;
