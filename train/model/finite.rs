//! Finite weights: a head whose weights hold NaN or inf is never saved, resumed, exported or
//! loaded, so "the last good checkpoint" is always a good one.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::Tensor;

/// How many NaN or inf values `t` holds (0 for an integer tensor).
pub fn non_finite_count(t: &Tensor) -> i64 {
    if !t.is_floating_point() {
        return 0;
    }
    t.isfinite()
        .logical_not()
        .sum(tch::Kind::Int64)
        .int64_value(&[])
}

/// Refuses tensors holding a non-finite value, naming each such tensor and its count (integer
/// tensors, such as a draft vocabulary's `d2t`, are always finite).
pub fn check_finite_tensors(tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut bad = Vec::new();
    let mut total = 0i64;
    for (name, t) in tensors {
        let count = non_finite_count(t);
        if count > 0 {
            total += count;
            bad.push(format!("{name} ({count})"));
        }
    }
    if !bad.is_empty() {
        let names: Vec<&str> = bad.iter().map(String::as_str).collect();
        bail!(
            "{total} non-finite weights (NaN or inf) in {}",
            crate::checks::first_few(&names)
        );
    }
    Ok(())
}
