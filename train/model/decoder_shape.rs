//! The shape of a LLaMA decoder layer, shared by a teacher's `config.json` and an exported draft
//! head's: one range check for both, so a head config is held to exactly what a teacher config is.

use crate::checks::Problems;

/// The fields that size a decoder layer and its RMSNorms.
pub struct DecoderShape {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub rms_norm_eps: f64,
}

impl DecoderShape {
    /// Records every value no weights can have: an empty dimension, heads that do not divide
    /// the hidden size or each other, an odd head dimension (RoPE rotates its two halves), an
    /// RMSNorm epsilon that is not a positive number (the norm would divide by zero or by the
    /// root of a negative number).
    pub fn check(&self, p: &mut Problems) {
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
        ] {
            p.require(value >= 1, name, format!("{value} < 1"));
        }
        p.require(
            self.head_dim >= 2 && self.head_dim % 2 == 0,
            "head_dim",
            format!(
                "{} is not an even number >= 2 (RoPE rotates two halves)",
                self.head_dim
            ),
        );
        if self.num_attention_heads >= 1 {
            p.require(
                self.hidden_size % self.num_attention_heads == 0,
                "hidden_size",
                format!(
                    "{} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        if self.num_key_value_heads >= 1 {
            p.require(
                self.num_attention_heads % self.num_key_value_heads == 0,
                "num_attention_heads",
                format!(
                    "{} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            );
        }
        p.require(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0,
            "rms_norm_eps",
            format!("{} is not a finite number > 0", self.rms_norm_eps),
        );
    }
}
