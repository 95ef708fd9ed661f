//! Decoding with the frozen teacher: sampling rules, plain generation, static trees,
//! tree-attention speculative decoding with a draft head, and the tau/speed evaluation.

pub mod eagle_drafter;
pub mod eval;
pub mod generate;
pub mod sampling;
pub mod speculative;
pub mod tree;
