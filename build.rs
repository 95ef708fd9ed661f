//! Build plumbing against the torch that tch links:
//! - link libtorch_cuda even though nothing references it by symbol, so CUDA works where present;
//! - bake an rpath to torch's lib dir so the binary runs without LD_LIBRARY_PATH;
//! - compile the native shims in `train/native/*.cpp` against torch's own headers (what tch does
//!   not wrap: allocator statistics and the c10d binding), with torch's C++ ABI; c10d's Gloo
//!   backend when gloo's headers are found, its NCCL backend when torch has CUDA and the venv
//!   holds nccl.h and the CUDA runtime headers (see train/native/c10d.cpp).
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the venv's python (`$PYTHON`, else `python3`: the one torch-sys finds torch with under
/// LIBTORCH_USE_PYTORCH) prints for `import torch, os; print(<expr>)`.
fn ask_torch(expr: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed=PYTHON");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args(["-c", &format!("import torch, os; print({expr})")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Torch's install root (the dir holding `lib/` and `include/`): `$LIBTORCH`, or the Python
/// package's dir as torch-sys finds it with LIBTORCH_USE_PYTORCH.
fn torch_root() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir));
    }
    ask_torch("os.path.dirname(torch.__file__)").map(PathBuf::from)
}

/// Torch's C++ ABI flag, as torch itself reports it: the shims must be compiled with the one
/// libtorch was, or std::string arguments cross the boundary in the wrong layout. A bare
/// `$LIBTORCH` has no python to ask: torch wheels since 2.7 use the new ABI, so that is assumed.
fn torch_cxx11_abi() -> &'static str {
    if std::env::var_os("LIBTORCH").is_none() {
        match ask_torch("int(torch._C._GLIBCXX_USE_CXX11_ABI)").as_deref() {
            Some("0") => return "0",
            Some("1") => return "1",
            other => println!(
                "cargo:warning=torch did not report its C++ ABI ({other:?}): assuming the new one"
            ),
        }
    }
    "1"
}

/// Reruns this script when torch changes under the same path (a venv upgrade): its version file
/// and its library dir.
fn watch_torch(root: &Path) {
    for path in [
        root.join("version.py"),
        root.join("build-version"),
        root.join("lib"),
    ] {
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
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

/// gloo's headers (`$GLOO_INCLUDE`, else Debian's libgloo-dev unpacked into .gloo-headers by
/// `make setup`, else the system's): c10d's ProcessGroupGloo.hpp includes them, torch wheels do
/// not ship them.
fn gloo_include() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    // Watched (created empty when absent, as .cuda-headers below) so that `make setup` unpacking
    // the headers after a first build rebuilds with the Gloo backend.
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".gloo-headers");
    let _ = std::fs::create_dir_all(&local);
    println!("cargo:rerun-if-changed={}", local.display());
    let candidates = match std::env::var("GLOO_INCLUDE") {
        Ok(dir) => vec![PathBuf::from(dir)],
        Err(_) => vec![
            local.join("usr/include"),
            PathBuf::from("/usr/include"),
            PathBuf::from("/usr/local/include"),
        ],
    };
    candidates
        .into_iter()
        .find(|dir| dir.join("gloo/rendezvous/store.h").exists())
}

/// The include dir under `nvidia/` (a site-packages layout: nvidia/cu13/include, ...) that
/// holds `header`.
fn nvidia_include(nvidia: &Path, header: &str) -> Option<PathBuf> {
    std::fs::read_dir(nvidia)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("include")))
        .find(|dir| dir.join(header).exists())
}

/// The include dirs c10d's ProcessGroupNCCL.hpp needs, when torch has CUDA: NCCL's and the CUDA
/// runtime's (pip dependencies of a CUDA torch, next to it under site-packages/nvidia), plus the
/// runtime headers' crt/ and nv/ parts that those wheels lack (`make setup` unpacks them into
/// .cuda-headers/nvidia/cu*/include).
fn nccl_includes(root: &Path) -> Option<Vec<PathBuf>> {
    if !root.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = root.parent()?.join("nvidia");
    let nccl = nvidia.join("nccl/include");
    let cuda = nvidia_include(&nvidia, "cuda_runtime.h")?;
    let extra = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cuda-headers/nvidia");
    // Watched so that `make setup` unpacking the headers rebuilds with NCCL; created empty when
    // absent, because cargo reruns a build script every time a watched path is missing.
    let _ = std::fs::create_dir_all(&extra);
    println!("cargo:rerun-if-changed={}", extra.display());
    let crt = nvidia_include(&extra, "crt/host_config.h")?;
    let cccl = nvidia_include(&extra, "nv/target")?;
    nccl.join("nccl.h")
        .exists()
        .then(|| vec![nccl, cuda, crt, cccl])
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
        .define("_GLIBCXX_USE_CXX11_ABI", torch_cxx11_abi())
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        // c10's CUDA headers align by the cache-line size; torch is built with the same value.
        .flag_if_supported("-Wno-interference-size")
        .opt_level(2);
    match gloo_include() {
        Some(dir) => {
            build.include(dir).define("USE_C10D_GLOO", None);
        }
        None => println!(
            "cargo:warning=gloo headers not found (install libgloo-dev or set GLOO_INCLUDE): \
             building without c10d's Gloo backend"
        ),
    }
    match nccl_includes(root) {
        Some(dirs) => {
            build.includes(dirs).define("USE_C10D_NCCL", None);
        }
        None if root.join("lib/libtorch_cuda.so").exists() => println!(
            "cargo:warning=NCCL or CUDA headers not found (run `make setup`): building without \
             c10d's NCCL backend"
        ),
        None => {}
    }
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
    watch_torch(&root);
    link_torch(&root.join("lib"));
    compile_native(&root);
}
