//! The models: LLaMA config and layers, the frozen teacher, the Clover-2 draft head, device policy.

pub mod config;
pub mod device;
pub mod head;
pub mod head_config;
pub mod layers;
pub mod random;
pub mod teacher;
