//! Decoding with the frozen teacher: sampling rules, plain generation, static trees,
//! tree-attention speculative decoding with a draft head, the tau/speed evaluation, and the
//! calibration and search that fit a tree to a head and a device.

pub mod calibrate;
pub mod dynamic;
pub mod eagle_drafter;
pub mod eval;
pub mod generate;
pub mod sampling;
pub mod speculative;
pub mod tree;
pub mod tree_search;
pub mod tree_spec;
