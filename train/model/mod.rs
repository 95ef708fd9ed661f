//! The models: LLaMA config and layers, the frozen teacher, the draft heads (a trait for what a
//! head kind is, one file per kind: Clover-2, the EAGLE-1 and Medusa-1 baselines and EAGLE-3, over one
//! shared weight store), device policy.

pub mod arch;
pub mod clover2;
pub mod config;
pub mod device;
pub mod draft_vocab;
pub mod eagle1;
pub mod eagle3;
pub mod eagle3_layer;
pub mod finite;
pub mod head;
pub mod head_config;
pub mod kinds;
pub mod layers;
pub mod medusa;
pub mod random;
pub mod store;
pub mod teacher;
