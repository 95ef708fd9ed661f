//! The tree setting a user names on the command line (`--tree`), parsed once into a typed
//! specification that every command (`eval`, `generate`) reads, so a name means the same thing
//! everywhere: "default" (or its own name "mc_sim_7b_63") is the built-in tree, "auto" and
//! "dynamic" are the searched and the grown trees, anything else is a JSON file of paths.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};

use crate::decode::tree::{Tree, DEFAULT_TREE};

/// A tree setting as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeSpec {
    /// The built-in `mc_sim_7b_63` tree (docs/clover2.md §4.1).
    Default,
    /// Searched from a calibration of the head on this device (docs/clover2.md §5.1).
    Auto,
    /// Grown from the draft's confidence every step (EAGLE-2).
    Dynamic,
    /// A JSON file holding a list of paths, e.g. `[[0],[1],[0,0]]`.
    File(PathBuf),
}

impl FromStr for TreeSpec {
    type Err = std::convert::Infallible;

    /// Every string names a setting: what is no built-in name is a file, whose reading reports
    /// a missing one.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "default" | DEFAULT_TREE => TreeSpec::Default,
            "auto" => TreeSpec::Auto,
            "dynamic" => TreeSpec::Dynamic,
            file => TreeSpec::File(PathBuf::from(file)),
        })
    }
}

impl fmt::Display for TreeSpec {
    /// The setting's name in reports and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TreeSpec::Default => f.write_str("default"),
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
            TreeSpec::File(path) => Tree::from_json_file(path),
            TreeSpec::Auto | TreeSpec::Dynamic => bail!(
                "{command} decodes with a static tree: --tree default or a JSON file of paths, \
                 not {self}"
            ),
        }
    }
}
