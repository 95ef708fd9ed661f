//! `clover report EVAL.json... --out DIR`: the comparison table and plots of eval reports.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::jobfiles::publish_dir;
use crate::outputs::{check_replaceable, refuse_overlap, write_marker};
use crate::training::report::{write_report, ReportOptions, PLOTS};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// `clover eval --report` files; each file's stem names its run in the table and plots.
    #[arg(required = true)]
    pub evals: Vec<PathBuf>,
    /// Output directory: report.md and the PNG plots (a previous report there is replaced only
    /// with --overwrite, and a directory holding anything else never).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a previous report at --out.
    #[arg(long)]
    pub overwrite: bool,
}

const REPORT_COMMAND: &str = "clover report";

/// Whether `name` is a file `clover report` writes (its outputs from before markers existed).
fn is_report_file(name: &str) -> bool {
    name == "report.md" || PLOTS.contains(&name)
}

/// Writes the report into a temporary directory renamed over --out when complete.
pub fn run(args: &ReportArgs) -> Result<()> {
    let inputs: Vec<(&str, &std::path::Path)> =
        args.evals.iter().map(|e| ("EVAL", e.as_path())).collect();
    refuse_overlap(("--out", &args.out), &inputs)?;
    check_replaceable(&args.out, REPORT_COMMAND, args.overwrite, &is_report_file)?;
    let mut runs = Vec::new();
    publish_dir(&args.out, |tmp| {
        write_marker(tmp, REPORT_COMMAND)?;
        runs = write_report(&ReportOptions {
            evals: args.evals.clone(),
            out: tmp.to_path_buf(),
        })?;
        Ok(())
    })?;
    print!("{}", crate::training::report::markdown_table(&runs));
    eprintln!(
        "wrote {} and {}",
        args.out.join("report.md").display(),
        PLOTS
            .map(|p| args.out.join(p).display().to_string())
            .join(", ")
    );
    Ok(())
}
