//! Finite weights: a head whose weights hold NaN or inf is never saved, resumed, exported or
//! loaded, so "the last good checkpoint" is always a good one.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::Tensor;

/// Refuses tensors holding a non-finite value, naming each such tensor and its count (integer
/// tensors, such as a draft vocabulary's `d2t`, are always finite).
pub fn check_finite_tensors(tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut bad = Vec::new();
    let mut total = 0i64;
    for (name, t) in tensors {
        if !t.is_floating_point() {
            continue;
        }
        let count = t
            .isfinite()
            .logical_not()
            .sum(tch::Kind::Int64)
            .int64_value(&[]);
        if count > 0 {
            total += count;
            bad.push(format!("{name} ({count})"));
        }
    }
    if !bad.is_empty() {
        bail!(
            "{total} non-finite weights (NaN or inf) in {}{}",
            bad.iter().take(4).cloned().collect::<Vec<_>>().join(", "),
            if bad.len() > 4 {
                format!(" and {} more tensors", bad.len() - 4)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
