//! `clover import-gguf`: a llama.cpp GGUF file as an HF-style model directory.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct ImportGgufArgs {
    /// The GGUF file (llama-family architecture)
    pub gguf: PathBuf,
    /// Output HF-style model directory (created; a previous import there is replaced only with
    /// --overwrite, and a directory holding anything else never)
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a previous import at --out.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &ImportGgufArgs) -> Result<()> {
    crate::outputs::refuse_overlap(("--out", &args.out), &[("GGUF", &args.gguf)])?;
    crate::outputs::check_replaceable(
        &args.out,
        "clover import-gguf",
        args.overwrite,
        &crate::formats::import::is_import_file,
    )?;
    let s = crate::formats::import::import_gguf(&args.gguf, &args.out)?;
    let types: Vec<String> = s
        .types_seen
        .iter()
        .map(|(t, n)| format!("{t} x{n}"))
        .collect();
    println!(
        "imported {} -> {}\n  {} tensors, {:.1}M parameters, types: {}\n  {} arch, {} layers, vocab {}, {} embeddings",
        args.gguf.display(),
        s.out_dir.display(),
        s.tensors,
        s.parameters as f64 / 1e6,
        types.join(", "),
        s.architecture,
        s.num_hidden_layers,
        s.vocab_size,
        if s.tie_word_embeddings { "tied" } else { "untied" },
    );
    Ok(())
}
