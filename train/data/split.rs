//! Deterministic splits and samples by a seeded hash of a key (an id, a template number): the
//! same key and seed give the same draw on every run and platform, and adding records never
//! moves the others.

use crate::data::shards::Split;

/// FNV-1a over the bytes, seeded, with a splitmix64 finalizer: stable across runs and platforms.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The key's place in [0, 1) for this seed: its 53 high hash bits as a fraction.
pub fn unit_of(key: &str, seed: u64) -> f64 {
    (stable_hash(key.as_bytes(), seed) >> 11) as f64 / (1u64 << 53) as f64
}

/// Deterministic split: a key whose place in [0, 1) lies below `eval_fraction` goes to eval.
pub fn split_of(id: &str, seed: u64, eval_fraction: f64) -> Split {
    if unit_of(id, seed) < eval_fraction {
        Split::Eval
    } else {
        Split::Train
    }
}

/// The keys in their seeded order (by place in [0, 1), ties by key): a shuffle that is the same
/// on every run, from which the first N are a seeded sample.
pub fn seeded_order<'a>(keys: impl IntoIterator<Item = &'a str>, seed: u64) -> Vec<&'a str> {
    let mut keyed: Vec<(u64, &str)> = keys
        .into_iter()
        .map(|k| (stable_hash(k.as_bytes(), seed), k))
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, k)| k).collect()
}
