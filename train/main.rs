fn main() {
    if let Err(err) = clover::cli::main() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
