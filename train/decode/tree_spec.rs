//! The tree setting a user names on the command line (`--tree`), parsed once into a typed
//! specification that every command (`eval`, `generate`, `calibrate`) reads, so a name means the
//! same thing everywhere: "default" (or its own name "mc_sim_7b_63") is the built-in tree,
//! "chain:N" a chain of N top drafts, "auto" and "dynamic" are the searched and the grown trees,
//! anything else is a JSON file of paths.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};

use crate::decode::tree::{Tree, DEFAULT_TREE, MAX_CHAIN};

/// A tree setting as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeSpec {
    /// The built-in `mc_sim_7b_63` tree (docs/clover2.md §4.1).
    Default,
    /// A chain of this many drafts, each depth's top draft (`Tree::chain`), 1 to `MAX_CHAIN`.
    Chain(usize),
    /// Searched from a calibration of the head on this device (docs/clover2.md §5.1).
    Auto,
    /// Grown from the draft's confidence every step (EAGLE-2).
    Dynamic,
    /// A JSON file holding a list of paths, e.g. `[[0],[1],[0,0]]`.
    File(PathBuf),
}

/// The prefix of a named chain, `chain:N` (a file of that name is reached as `./chain:N`).
const CHAIN_PREFIX: &str = "chain:";

impl FromStr for TreeSpec {
    type Err = String;

    /// Every string names a setting: what is no built-in name is a file, whose reading reports
    /// a missing one. Only a `chain:` whose length is no count from 1 to `MAX_CHAIN` is refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "default" | DEFAULT_TREE => TreeSpec::Default,
            "auto" => TreeSpec::Auto,
            "dynamic" => TreeSpec::Dynamic,
            _ if s.starts_with(CHAIN_PREFIX) => TreeSpec::Chain(chain_length(s)?),
            file => TreeSpec::File(PathBuf::from(file)),
        })
    }
}

/// N of `chain:N`, 1 to `MAX_CHAIN`.
fn chain_length(s: &str) -> Result<usize, String> {
    let n = &s[CHAIN_PREFIX.len()..];
    match n.parse::<usize>() {
        Ok(n) if (1..=MAX_CHAIN).contains(&n) => Ok(n),
        Ok(n) => Err(format!(
            "{s:?}: a chain of {n} drafts; use chain:1 to chain:{MAX_CHAIN}"
        )),
        Err(_) => Err(format!(
            "{s:?}: expected chain:N with N the number of drafts, 1 to {MAX_CHAIN}"
        )),
    }
}

impl fmt::Display for TreeSpec {
    /// The setting's name in reports and messages (what parses back to the same setting).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TreeSpec::Default => f.write_str("default"),
            TreeSpec::Chain(n) => write!(f, "{CHAIN_PREFIX}{n}"),
            TreeSpec::Auto => f.write_str("auto"),
            TreeSpec::Dynamic => f.write_str("dynamic"),
            TreeSpec::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl TreeSpec {
    /// The static tree this setting names; `auto` and `dynamic` are chosen per head and step,
    /// so `command` (which has no such choice) refuses them by name.
    pub fn static_tree(&self, command: &str) -> Result<Tree> {
        match self {
            TreeSpec::Default => Ok(Tree::default_tree()),
            TreeSpec::Chain(n) => Tree::chain(*n),
            TreeSpec::File(path) => Tree::from_json_file(path),
            TreeSpec::Auto | TreeSpec::Dynamic => bail!(
                "{command} decodes with a static tree: --tree default, chain:N or a JSON file of \
                 paths, not {self}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_display_back() {
        let longest = format!("chain:{MAX_CHAIN}");
        for name in [
            "default", "chain:1", "chain:3", &longest, "auto", "dynamic", "t.json",
        ] {
            let spec: TreeSpec = name.parse().unwrap();
            assert_eq!(spec.to_string(), name);
            assert_eq!(spec.to_string().parse::<TreeSpec>().unwrap(), spec);
        }
        assert_eq!("chain:3".parse::<TreeSpec>().unwrap(), TreeSpec::Chain(3));
        assert_eq!(DEFAULT_TREE.parse::<TreeSpec>().unwrap(), TreeSpec::Default);
        // A file whose name starts like a chain is reached through a directory.
        assert_eq!(
            "./chain:3".parse::<TreeSpec>().unwrap(),
            TreeSpec::File("./chain:3".into())
        );
    }

    #[test]
    fn bad_chain_lengths_are_refused_by_name() {
        let too_long = MAX_CHAIN + 1;
        for (name, says) in [
            ("chain:0".to_string(), "a chain of 0 drafts".to_string()),
            (
                format!("chain:{too_long}"),
                format!("a chain of {too_long} drafts"),
            ),
            ("chain:".into(), "expected chain:N".into()),
            ("chain:-1".into(), "expected chain:N".into()),
            ("chain:two".into(), "expected chain:N".into()),
        ] {
            let err = name.parse::<TreeSpec>().unwrap_err();
            assert!(err.contains(&name) && err.contains(&says), "{name}: {err}");
        }
    }

    #[test]
    fn chain_spec_builds_the_chain_tree() {
        let tree = TreeSpec::Chain(4).static_tree("eval").unwrap();
        let want: Vec<Vec<usize>> = (0..=4).map(|d| vec![0; d]).collect();
        assert_eq!(tree.paths, want);
    }
}
