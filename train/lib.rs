//! clover: train and evaluate Clover-2 speculative-decoding draft heads with libtorch.
pub mod head;
pub mod teacher;
pub mod data;
pub mod targets;
pub mod loss;
pub mod trainer;
pub mod export;
