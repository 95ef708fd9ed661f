//! Valid ranges of settings, checked where a value enters: command-line options through these
//! clap value parsers, config files through each config struct's `validate`. A bad value is
//! refused at once with the value and its range, never deep inside a run.

/// A sampling temperature: finite and >= 0 (0 = greedy).
pub fn temperature(text: &str) -> Result<f64, String> {
    let t = parse_f64(text)?;
    if t.is_finite() && t >= 0.0 {
        Ok(t)
    } else {
        Err(format!(
            "{t} is not a temperature: use a finite number >= 0 (0 = greedy)"
        ))
    }
}

/// A fraction in [0, 1): a share that must leave something on the other side.
pub fn fraction_below_one(text: &str) -> Result<f64, String> {
    let f = parse_f64(text)?;
    if (0.0..1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("{f} is out of range: use a number in [0, 1)"))
    }
}

/// A count of at least 1.
pub fn positive(text: &str) -> Result<usize, String> {
    at_least(text, 1)
}

/// A sequence length of at least 2 tokens (one input and one target).
pub fn sequence_length(text: &str) -> Result<usize, String> {
    at_least(text, 2)
}

/// A count of at least 0 (0 meaning off, where an option says so).
pub fn count(text: &str) -> Result<usize, String> {
    at_least(text, 0)
}

/// A signed count of at least 1 (libtorch sizes are i64).
pub fn positive_i64(text: &str) -> Result<i64, String> {
    at_least(text, 1).and_then(|n| i64::try_from(n).map_err(|e| e.to_string()))
}

/// At most this many: beyond it, sizes overflow libtorch's i64 indexing and nothing can be meant.
pub const MAX_COUNT: usize = 1 << 40;

fn at_least(text: &str, min: usize) -> Result<usize, String> {
    let n: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number >= {min}"))?;
    if n < min {
        Err(format!("{n} is too small: use a whole number >= {min}"))
    } else if n > MAX_COUNT {
        Err(format!("{n} is too large: use at most {MAX_COUNT}"))
    } else {
        Ok(n)
    }
}

fn parse_f64(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a number"))
}

/// A duration in seconds from an environment variable `var` holding `text`, within `range`
/// (a finite number: `Duration` cannot hold what is past it, and values far outside any sensible
/// range are typos). The error names the variable, its value and the range.
pub fn seconds_in(
    var: &str,
    text: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<std::time::Duration, String> {
    let (min, max) = (*range.start(), *range.end());
    match text.trim().parse::<f64>() {
        Ok(secs) if range.contains(&secs) => Ok(std::time::Duration::from_secs_f64(secs)),
        _ => Err(format!(
            "{var} = {text:?} is not a number of seconds in {min} ..= {max}"
        )),
    }
}

/// The first few of `names`, then how many more: an error stays readable for thousands.
pub fn first_few(names: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut text = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// Collects every out-of-range field of one config, so a user fixes them all in one go.
#[derive(Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Records `message` about `field` when `ok` is false.
    pub fn require(&mut self, ok: bool, field: &str, message: impl std::fmt::Display) {
        if !ok {
            self.0.push(format!("{field}: {message}"));
        }
    }

    /// Records `field` unless `value` is a finite number > 0 (a scale, a base, an epsilon).
    pub fn require_positive(&mut self, field: &str, value: f64) {
        self.require(
            value.is_finite() && value > 0.0,
            field,
            format!("{value} is not a finite number > 0"),
        );
    }

    /// Ok when nothing was recorded; otherwise one error listing every problem, naming `origin`.
    pub fn into_result(self, origin: &str) -> anyhow::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{origin}: invalid settings:\n  {}", self.0.join("\n  "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_refuse_what_cannot_be_meant() {
        for bad in ["NaN", "inf", "-inf", "-1", "", "x"] {
            assert!(temperature(bad).is_err(), "temperature {bad:?}");
        }
        assert_eq!(temperature("0"), Ok(0.0));
        assert_eq!(temperature("0.7"), Ok(0.7));
        for bad in ["1", "1.5", "-0.1", "NaN"] {
            assert!(fraction_below_one(bad).is_err(), "fraction {bad:?}");
        }
        assert_eq!(fraction_below_one("0"), Ok(0.0));
        for bad in ["0", "-3", "1.5", "", "99999999999999999999999"] {
            assert!(positive(bad).is_err(), "count {bad:?}");
        }
        assert_eq!(positive("3"), Ok(3));
        assert_eq!(count("0"), Ok(0));
        for bad in ["-1", "1.5", "", "99999999999999999999999"] {
            assert!(count(bad).is_err(), "count {bad:?}");
        }
        assert!(sequence_length("1").is_err());
        for bad in ["NaN", "inf", "1e20", "1e-6", "0", "-1", "", "x", "1e300"] {
            assert!(seconds_in("V", bad, 0.1..=60.0).is_err(), "seconds {bad:?}");
        }
        assert_eq!(
            seconds_in("V", " 2.5 ", 0.1..=60.0),
            Ok(std::time::Duration::from_millis(2500))
        );
        assert_eq!(sequence_length("2"), Ok(2));
    }
}
