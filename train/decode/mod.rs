//! Decoding with the frozen teacher: sampling rules, plain generation, static trees,
//! tree-attention speculative decoding with a draft head (drafting, the tree policies,
//! verification and the loop, each in its own file), the tau/speed evaluation, and the
//! calibration and search that fit a tree to a head and a device.

pub mod calibrate;
pub mod drafter;
pub mod dynamic;
pub mod eval;
pub mod generate;
pub mod sampling;
pub mod speculative;
pub mod tree;
pub mod tree_policy;
pub mod tree_search;
pub mod tree_spec;
pub mod verify;
