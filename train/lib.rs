//! clover: train and evaluate Clover-2 speculative-decoding draft heads with libtorch.
pub mod head;
pub mod teacher;
