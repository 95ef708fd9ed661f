//! `clover init-random`: a model directory with a real architecture and random weights.

use std::path::PathBuf;

use anyhow::Result;

use crate::model::random::{write_random_model, Like};

#[derive(clap::Args, Debug)]
pub struct InitRandomArgs {
    /// The architecture to copy.
    #[arg(long, value_enum)]
    pub like: Like,
    /// Decoder layers (default: the architecture's own; fewer keep a 7B/8B-shaped model small).
    #[arg(long, value_parser = crate::checks::positive_i64)]
    pub layers: Option<i64>,
    /// The new model directory (must be empty or absent).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

pub fn run(args: &InitRandomArgs) -> Result<()> {
    write_random_model(args.like, args.layers, &args.out, args.seed)?;
    let arch = args.like.architecture();
    println!(
        "wrote a random {:?}-shaped model ({} layers, hidden {}, vocab {}) to {}",
        args.like,
        args.layers.unwrap_or(arch.num_hidden_layers),
        arch.hidden_size,
        arch.vocab_size,
        args.out.display()
    );
    Ok(())
}
