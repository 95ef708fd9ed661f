//! Draft vocabularies (FR-Spec, EAGLE-3): the tokens a draft head scores, chosen by how often
//! they are targets in the training data.

use anyhow::{ensure, Result};

use crate::data::shards::Sample;

/// The `n` most frequent loss-masked (answer) tokens of `samples`, most frequent first, ties by
/// lower id. When fewer than `n` distinct tokens occur, the rest are filled with the lowest
/// unused ids, so the vocabulary always has `n` entries.
pub fn frequent_tokens(samples: &[Sample], n: usize, vocab_size: usize) -> Result<Vec<i64>> {
    ensure!(
        (1..=vocab_size).contains(&n),
        "a draft vocabulary of {n} tokens must hold between 1 and the teacher's {vocab_size}"
    );
    let mut counts = vec![0u64; vocab_size];
    for s in samples {
        for (&id, &m) in s.input_ids.iter().zip(&s.loss_mask) {
            if m != 0 {
                ensure!(
                    (0..vocab_size as i64).contains(&id),
                    "sample {}: token {id} is outside the teacher's {vocab_size} ids",
                    s.id
                );
                counts[id as usize] += 1;
            }
        }
    }
    let mut ids: Vec<i64> = (0..vocab_size as i64).collect();
    // Stable sort: equal counts (zero included) keep id order.
    ids.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]));
    ids.truncate(n);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_frequent_answer_tokens_first_then_lowest_ids() {
        let s = Sample {
            id: "a".into(),
            input_ids: vec![9, 9, 9, 4, 4, 7, 7, 7],
            loss_mask: vec![0, 0, 0, 1, 1, 1, 1, 1],
        };
        // 9 occurs only outside the answer; 7 thrice, 4 twice, then ids 0, 1.
        assert_eq!(
            frequent_tokens(&[s.clone()], 4, 10).unwrap(),
            vec![7, 4, 0, 1]
        );
        assert!(frequent_tokens(&[s.clone()], 0, 10).is_err());
        assert!(
            frequent_tokens(&[s], 3, 7).is_err(),
            "answer token 7 >= vocab 7"
        );
    }
}
