//! Builds the eBPF object and puts it in OUT_DIR for `include_bytes_aligned!`.
//!
//! The programs are compiled with the nightly toolchain for `bpfel-unknown-none`
//! into their own target directory (`target/ebpf`), so this nested cargo
//! never waits on the lock of the build that runs this script. Cargo reruns
//! this script only when the eBPF sources change.
//!
//! Set `TOLLGATE_EBPF_OBJECT` to use a prebuilt object instead.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().expect("agent/ lives in the workspace").to_owned();
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("tollgate.bpf.o");
    println!("cargo:rerun-if-env-changed=TOLLGATE_EBPF_OBJECT");

    if let Ok(prebuilt) = env::var("TOLLGATE_EBPF_OBJECT") {
        println!("cargo:rerun-if-changed={prebuilt}");
        std::fs::copy(&prebuilt, &out).unwrap_or_else(|e| panic!("cannot copy TOLLGATE_EBPF_OBJECT {prebuilt}: {e}"));
        return;
    }
    for dir in ["ebpf/programs/src", "ebpf/common/src"] {
        watch(&workspace.join(dir));
    }
    for file in ["ebpf/programs/Cargo.toml", "ebpf/common/Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(file).display());
    }

    let target_dir =
        env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace.join("target")).join("ebpf");
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--package", "tollgate-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&workspace)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    // The outer build's settings are for the host; none of them apply here.
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTUP_TOOLCHAIN"
        {
            cargo.env_remove(&key);
        }
    }
    cargo.env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    // The workspace's release LTO and single codegen unit are for the
    // daemon; the kernel object builds with cargo's defaults, as before.
    cargo.env("CARGO_PROFILE_RELEASE_LTO", "false").env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16");
    let status = cargo
        .status()
        .unwrap_or_else(|e| panic!("cannot run rustup to build the eBPF programs: {e}; run `cargo xtask setup`"));
    if !status.success() {
        panic!(
            "building the eBPF programs failed; `cargo xtask setup` installs the nightly rust-src and bpf-linker they need"
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/tollgate-ebpf");
    std::fs::copy(&built, &out).unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
}

fn watch(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                watch(&path);
            } else {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
