//! The registry of head kinds: the one place a `HeadKind` (a config's `head = "..."`) is turned
//! into its architecture. Adding a kind is its own file implementing `HeadArch`, its name in
//! `HeadKind`, and one line here.

use anyhow::Result;

use crate::checks::Problems;
use crate::model::arch::HeadArch;
use crate::model::clover2::Clover2;
use crate::model::eagle1::Eagle1;
use crate::model::eagle3::Eagle3;
use crate::model::head_config::{HeadConfig, HeadKind, HeadOptions};
use crate::model::medusa::Medusa;

/// Every kind, for what must know them all (the file names an export may hold).
pub const ALL_KINDS: [HeadKind; 4] = [
    HeadKind::Clover2,
    HeadKind::Eagle1,
    HeadKind::Medusa,
    HeadKind::Eagle3,
];

/// The architecture of `kind`.
pub fn arch_of(kind: HeadKind) -> &'static dyn HeadArch {
    match kind {
        HeadKind::Clover2 => &Clover2,
        HeadKind::Eagle1 => &Eagle1,
        HeadKind::Medusa => &Medusa,
        HeadKind::Eagle3 => &Eagle3,
    }
}

/// Records the options' ranges and the rules of their kind (which options apply to it).
pub fn check_options(opts: &HeadOptions, p: &mut Problems) {
    opts.check(p);
    arch_of(opts.head).check_options(opts, p);
}

/// Refuses, all at once, a head config's out-of-range values and what its kind does not take.
pub fn validate(cfg: &HeadConfig, origin: &str) -> Result<()> {
    let mut p = Problems::default();
    cfg.check(&mut p);
    arch_of(cfg.options.head).check_options(&cfg.options, &mut p);
    p.into_result(origin)
}
