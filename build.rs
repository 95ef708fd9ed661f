//! Build plumbing against the torch that tch links:
//! - link libtorch_cuda even though nothing references it by symbol, so CUDA works where present;
//! - bake an rpath to torch's lib dir so the binary runs without LD_LIBRARY_PATH;
//! - compile the native shims in `train/native/*.cpp` against torch's own headers (what tch does
//!   not wrap: allocator statistics, and later c10d), with torch's C++ ABI.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Torch's install root (the dir holding `lib/` and `include/`): `$LIBTORCH`, or the Python
/// package's dir as torch-sys finds it with LIBTORCH_USE_PYTORCH.
fn torch_root() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir));
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args([
            "-c",
            "import torch, os; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn link_torch(lib: &Path) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The C++ sources under train/native, compiled into one static library.
fn native_sources() -> Vec<PathBuf> {
    let dir = Path::new("train/native");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("train/native exists")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "cpp"))
        .collect();
    sources.sort();
    sources
}

fn compile_native(root: &Path) {
    let include = root.join("include");
    assert!(
        include.join("c10").is_dir(),
        "torch headers not found under {} (set LIBTORCH or LIBTORCH_USE_PYTORCH=1 with torch's venv on PATH)",
        include.display()
    );
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // torch wheels since 2.7 are built with the new libstdc++ ABI.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .opt_level(2);
    for source in native_sources() {
        build.file(source);
    }
    build.compile("clover_native");
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let root = torch_root().expect(
        "torch not found: set LIBTORCH, or LIBTORCH_USE_PYTORCH=1 with torch's venv first on PATH",
    );
    link_torch(&root.join("lib"));
    compile_native(&root);
}
