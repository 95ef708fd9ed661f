//! The first `limit` tokens of a text without tokenizing all of it.
//!
//! A record may be one 150 MB string or 100k turns while only `--max-len` tokens of it are kept,
//! and the tokenizer holds about a hundred bytes of state per byte it is given: tokenizing the
//! whole of such a record takes minutes and gigabytes for nothing. Tokenization is local, so a
//! prefix that holds comfortably more than `limit` tokens gives the same first `limit` tokens as
//! the whole text. Neither "local" nor "comfortably" is taken on trust:
//!
//! - Size: the first prefix is `limit` times the longest vocabulary entry's bytes, which holds
//!   at least `limit` tokens for the usual tokenizers (a token covers no more text bytes than its
//!   entry spells: byte-level BPE writes each byte as one or two UTF-8 bytes, SentencePiece's
//!   '▁' takes three for a space's one). A normalizer that shrinks text (NFKC) or a fused unknown
//!   token covering a long run can beat that bound, so the prefix is only used when it did yield
//!   more than `limit` tokens, and is doubled otherwise.
//! - Locality: the last pre-token of a prefix is cut (a long word, a run of spaces) and may
//!   tokenize differently from the whole. A prefix's first `limit` tokens are only used when the
//!   prefix twice as long gives the same ones (ids and offsets); otherwise the prefix is doubled.
//!
//! Doubling ends, at the latest, with the whole text, tokenized as before: the work is at most a
//! few times the prefix that settles the head, and never more than about three times the whole.
//! A text that fits within twice the first prefix is tokenized whole, so ordinary records are
//! tokenized exactly as they always were.

use anyhow::{anyhow, Result};
use tokenizers::{Encoding, Tokenizer};

/// A text that can be produced piecewise from its start (a conversation rendered turn by turn).
pub trait GrowingText {
    /// Extends the text until it holds at least `bytes` bytes or is complete.
    fn reach(&mut self, bytes: usize) -> Result<()>;
    /// The text so far: a prefix of the whole text, or all of it once complete.
    fn text(&self) -> &str;
    fn is_complete(&self) -> bool;
}

/// A text that is already whole.
pub struct WholeText<'a>(pub &'a str);

impl GrowingText for WholeText<'_> {
    fn reach(&mut self, _bytes: usize) -> Result<()> {
        Ok(())
    }
    fn text(&self) -> &str {
        self.0
    }
    fn is_complete(&self) -> bool {
        true
    }
}

/// The first tokens of a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// At most `limit` ids: the whole text's first ones.
    pub ids: Vec<i64>,
    /// Byte offsets of `ids` in the text.
    pub offsets: Vec<(usize, usize)>,
    /// The whole text has more than `limit` tokens.
    pub truncated: bool,
    /// Bytes handed to the tokenizer over every attempt: the work this head cost.
    pub tokenized_bytes: usize,
}

/// The smallest first prefix: below it, doubling a prefix cut on a char boundary (up to four
/// bytes back) could give the same prefix twice and make the agreement check vacuous.
const MIN_PREFIX_BYTES: usize = 64;

/// The first `limit` tokens of `text` (no special tokens added, as the chat encoders do);
/// `max_token_bytes` is the longest vocabulary entry's length in bytes.
pub fn encode_head(
    tokenizer: &Tokenizer,
    text: &mut impl GrowingText,
    limit: usize,
    max_token_bytes: usize,
) -> Result<Head> {
    let mut prefix_bytes = limit
        .saturating_mul(max_token_bytes.max(1))
        .max(MIN_PREFIX_BYTES);
    let mut tokenized_bytes = 0;
    let mut shorter: Option<Encoding> = None;
    loop {
        let longer_bytes = prefix_bytes.saturating_mul(2);
        text.reach(longer_bytes)?;
        if text.is_complete() && text.text().len() <= longer_bytes {
            let whole = encode(tokenizer, text.text(), &mut tokenized_bytes)?;
            let truncated = whole.len() > limit;
            return Ok(head_of(&whole, limit, truncated, tokenized_bytes));
        }
        let shorter_encoding = match shorter.take() {
            Some(encoding) => encoding,
            None => encode(
                tokenizer,
                prefix(text.text(), prefix_bytes),
                &mut tokenized_bytes,
            )?,
        };
        let longer = encode(
            tokenizer,
            prefix(text.text(), longer_bytes),
            &mut tokenized_bytes,
        )?;
        if shorter_encoding.len() > limit && same_head(&shorter_encoding, &longer, limit) {
            return Ok(head_of(&longer, limit, true, tokenized_bytes));
        }
        shorter = Some(longer);
        prefix_bytes = longer_bytes;
    }
}

fn encode(tokenizer: &Tokenizer, text: &str, tokenized_bytes: &mut usize) -> Result<Encoding> {
    *tokenized_bytes += text.len();
    tokenizer
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizing {} bytes of text: {e}", text.len()))
}

/// The longest prefix of at most `bytes` bytes that ends on a char boundary.
fn prefix(text: &str, bytes: usize) -> &str {
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Both encodings have at least `limit` tokens and agree on the first `limit` (ids and offsets).
fn same_head(a: &Encoding, b: &Encoding, limit: usize) -> bool {
    let ids = a.get_ids().get(..limit);
    ids.is_some()
        && ids == b.get_ids().get(..limit)
        && a.get_offsets().get(..limit) == b.get_offsets().get(..limit)
}

fn head_of(encoding: &Encoding, limit: usize, truncated: bool, tokenized_bytes: usize) -> Head {
    let kept = encoding.len().min(limit);
    Head {
        ids: encoding.get_ids()[..kept]
            .iter()
            .map(|&id| id as i64)
            .collect(),
        offsets: encoding.get_offsets()[..kept].to_vec(),
        truncated,
        tokenized_bytes,
    }
}
