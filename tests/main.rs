//! Integration tests: real libtorch, real fixtures, and the real SmolLM2 teacher where it matters.

mod common;
mod teacher;
mod tree;
