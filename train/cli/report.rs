//! `clover report EVAL.json... --out DIR`: the comparison table and plots of eval reports.

use std::path::PathBuf;

use anyhow::Result;

use crate::training::report::{write_report, ReportOptions, PLOTS};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// `clover eval --report` files; each file's stem names its run in the table and plots.
    #[arg(required = true)]
    pub evals: Vec<PathBuf>,
    /// Output directory: report.md and the PNG plots.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let runs = write_report(&ReportOptions {
        evals: args.evals.clone(),
        out: args.out.clone(),
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
