//! Project tasks: `cargo xtask setup | build | run | test`.
//!
//! Everything a fresh machine needs is installed by `setup`, which every
//! other task calls first; it is idempotent and quick when nothing is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod vm;

/// The packaging tools, pinned so packages do not change under us.
const CARGO_DEB_VERSION: &str = "3.8.0";
const CARGO_GENERATE_RPM_VERSION: &str = "0.21.1";

/// The bpf-linker release that loads the nightly toolchain's own LLVM 22.
const BPF_LINKER_VERSION: &str = "0.10.4";
/// Debian packages the test suite drives (setpriv runs sessions as another user).
/// Each is (a shell test that it is there, the package). nginx is a real
/// TLS upstream for the proxy tests; the tests start their own instances.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("command -v setpriv", "util-linux"),
    ("command -v curl", "curl"),
    ("command -v python3", "python3"),
    ("python3 -c 'import requests'", "python3-requests"),
    ("command -v nginx", "nginx-light"),
    ("command -v openssl", "openssl"),
    ("command -v qemu-system-x86_64", "qemu-system-x86"),
    // The VM's initramfs needs busybox linked statically (ldd fails on it).
    ("test -x /bin/busybox && ! ldd /bin/busybox >/dev/null 2>&1", "busybox-static"),
    ("command -v cpio", "cpio"),
    // The audit tests edit the session log behind the daemon's back.
    ("command -v sqlite3", "sqlite3"),
    // pg_query builds PostgreSQL's parser with bindgen, which needs libclang.
    ("test -e /usr/lib/llvm-14/lib/libclang.so || ls /usr/lib/llvm-*/lib/libclang.so", "libclang-dev"),
    // The PostgreSQL tests start a server of their own (psql, pgbench and initdb come with it).
    ("ls /usr/lib/postgresql/*/bin/postgres /usr/lib/postgresql/*/bin/pgbench", "postgresql"),
    // The DNS tests' upstream: a real server with fixed answers and a query log.
    ("command -v dnsmasq", "dnsmasq-base"),
    // The benchmark's load generator and peers.
    ("command -v wrk", "wrk"),
    ("command -v pgbouncer", "pgbouncer"),
    // The unit's sandboxing is scored by systemd-analyze security.
    ("command -v systemd-analyze", "systemd"),
    // The packages are linted and inspected.
    ("command -v lintian", "lintian"),
    ("command -v rpm", "rpm"),
    // The systemd VM's root file system.
    ("command -v mmdebstrap", "mmdebstrap"),
    ("command -v mkfs.ext4", "e2fsprogs"),
    // Reports: the HTML report is opened in headless Chromium and its
    // screenshot read back with OCR; /metrics is parsed by the Prometheus client.
    ("command -v chromium", "chromium"),
    ("command -v tesseract", "tesseract-ocr"),
    ("/usr/bin/python3 -c 'import prometheus_client'", "python3-prometheus-client"),
];
/// The architectures tollgate is built and packaged for: the host's, and
/// arm64 cross-built with Debian's cross toolchain.
pub const ARM64: &str = "aarch64-unknown-linux-gnu";
/// What cross-building and booting arm64 needs, as (a shell test, the package).
const ARM64_PACKAGES: &[(&str, &str)] = &[
    ("command -v aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ("test -e /usr/aarch64-linux-gnu/include/stdio.h", "libc6-dev-arm64-cross"),
    ("command -v aarch64-linux-gnu-strip", "binutils-aarch64-linux-gnu"),
    ("command -v qemu-system-aarch64", "qemu-system-arm"),
];

/// Keeps package scripts from starting services (nginx would take port 80).
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

#[derive(Parser)]
#[command(name = "xtask", about = "tollgate project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (nightly rust-src, bpf-linker, apt packages).
    Setup,
    /// Build the tollgate binary (and the eBPF object it embeds).
    Build {
        /// Build with optimizations.
        #[arg(long)]
        release: bool,
        /// Cross-build for this target (aarch64-unknown-linux-gnu).
        #[arg(long, value_name = "TRIPLE", value_parser = [ARM64])]
        target: Option<String>,
    },
    /// Build, then run the daemon in the foreground with the repo's dev config
    /// and policies (state in target/tollgate-dev). Needs root.
    Run,
    /// Build release, then measure tollgate against the direct path and its
    /// peers (nginx, pgbouncer) in one run; the table goes to stdout and
    /// target/bench/ (needs root).
    Bench {
        /// One short round of every row (a minute, not several).
        #[arg(long)]
        quick: bool,
    },
    /// Build release, then the .deb and .rpm into target/package/ (with
    /// shell completions and man pages generated from the CLI).
    Package,
    /// Build, then run every test: unit tests and the integration suite
    /// against the real kernel, then the kernel matrix in QEMU (needs root).
    Test {
        /// Only the kernel matrix.
        #[arg(long, conflicts_with = "no_vm")]
        vm: bool,
        /// Skip the kernel matrix (it is part of the default run).
        #[arg(long)]
        no_vm: bool,
        /// Boot only these machines of the matrix (labels as the report prints them,
        /// e.g. debian-12-arm64-6.1 or debian-12-systemd).
        #[arg(long = "kernel", value_name = "LABEL")]
        kernels: Vec<String>,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup(),
        Task::Build { release, target } => {
            setup()?;
            match target {
                Some(target) => build_for(&root, release, &target),
                None => build(&root, release),
            }
        }
        Task::Run => {
            require_root("cargo xtask run")?;
            setup()?;
            build(&root, false)?;
            let config = root.join("packaging/dev/config.yaml");
            println!("tollgate: starting the daemon with {}", config.display());
            println!("tollgate: in another shell, try:");
            println!("  target/debug/tollgate token mint --config {} --sub me > /tmp/tollgate.token", config.display());
            println!(
                "  target/debug/tollgate run --token-file /tmp/tollgate.token -- sh -c 'id; curl -sI http://127.0.0.1/ || true'"
            );
            println!("  target/debug/tollgate sessions; target/debug/tollgate show <SESSION>");
            run(Command::new(root.join("target/debug/tollgate")).arg("daemon").arg("--config").arg(config))
        }
        Task::Bench { quick } => {
            require_root("cargo xtask bench")?;
            setup()?;
            build(&root, true)?;
            let mut cargo = cargo();
            cargo.current_dir(&root).args(["bench", "-p", "tollgate-tests", "--bench", "bench"]);
            if quick {
                cargo.args(["--", "--quick"]);
            }
            cargo.env("TOLLGATE_BIN", root.join("target/release/tollgate"));
            run(&mut cargo)
        }
        Task::Package => {
            setup()?;
            package(&root)
        }
        Task::Test { vm, no_vm, kernels, args } => {
            require_root("cargo xtask test")?;
            report_free_disk(&root);
            setup()?;
            build(&root, false)?;
            if !vm {
                // The packaging tests look at what `package` built.
                package(&root)?;
                let mut cargo = cargo();
                cargo.current_dir(&root).arg("test").args(&args);
                cargo.env("TOLLGATE_BIN", root.join("target/debug/tollgate"));
                run(&mut cargo)?;
            }
            if no_vm {
                return Ok(());
            }
            if vm {
                // The systemd VM installs the package.
                package(&root)?;
            }
            vm::run(&root, &kernels)
        }
    }
}

/// Builds the release binary, generates completions and man pages, and
/// packs the .deb (cargo-deb) and the .rpm (cargo-generate-rpm).
fn package(root: &Path) -> anyhow::Result<()> {
    for (tool, version) in [("cargo-deb", CARGO_DEB_VERSION), ("cargo-generate-rpm", CARGO_GENERATE_RPM_VERSION)] {
        let installed = output(cargo().args(["install", "--list"]));
        if !installed.contains(&format!("{tool} v{version}")) {
            eprintln!("xtask: installing {tool} {version}");
            run(cargo().args(["install", tool, "--version", version, "--locked", "--force"]))?;
        }
    }
    build(root, true)?;
    build_for(root, true, ARM64)?;
    let out = root.join("target/package");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let assets = root.join("target/release/package-assets");
    let _ = std::fs::remove_dir_all(&assets);
    run(Command::new(root.join("target/release/tollgate")).arg("generate").arg(&assets))?;
    // Debian ships man pages and changelogs compressed (-n: no name or time, reproducible).
    std::fs::copy(root.join("packaging/debian/changelog"), assets.join("changelog.Debian"))?;
    let mut gzip = Command::new("gzip");
    gzip.args(["-9", "-n", "-f"]).arg(assets.join("changelog.Debian"));
    for page in std::fs::read_dir(assets.join("man"))? {
        gzip.arg(page?.path());
    }
    run(&mut gzip)?;
    run(cargo().current_dir(root).args(["deb", "-p", "tollgate", "--no-build", "--output"]).arg(&out))?;
    run(cargo().current_dir(root).args(["generate-rpm", "-p", "agent", "--output"]).arg(&out))?;
    // The arm64 packages: the same files, with the arm64 binary. Both tools
    // read `target/release/...` as `target/<target>/release/...` for a
    // target, so the generated files go there too.
    let cross_assets = root.join("target").join(ARM64).join("release/package-assets");
    let _ = std::fs::remove_dir_all(&cross_assets);
    run(Command::new("cp").arg("-r").arg(&assets).arg(&cross_assets))?;
    run(cargo()
        .current_dir(root)
        .args(["deb", "-p", "tollgate", "--no-build", "--target", ARM64, "--output"])
        .arg(&out))?;
    run(cargo().current_dir(root).args(["generate-rpm", "-p", "agent", "--target", ARM64, "--output"]).arg(&out))?;
    println!("xtask: packages in {}", out.display());
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Disk the whole suite needs: a fresh clone's peak was 5.1 GB (the builds,
/// the kernels, the VM images), and `cargo install` builds beside it.
const SUITE_DISK_BYTES: u64 = 7 << 30;

/// Says up front when the disk is too small for the suite, so that a run
/// that fails on a full disk is read as such, not as a failed test.
fn report_free_disk(root: &Path) {
    let listed = output(Command::new("df").args(["--output=avail", "-B1"]).arg(root));
    let Some(free) = listed.lines().nth(1).and_then(|line| line.trim().parse::<u64>().ok()) else {
        return;
    };
    eprintln!("xtask: {:.1} GB free on the disk of {}", free as f64 / f64::from(1 << 30), root.display());
    if free < SUITE_DISK_BYTES {
        eprintln!(
            "xtask: warning: the whole suite needs about {} GB there; it may fail on a full disk",
            SUITE_DISK_BYTES >> 30
        );
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(command: &mut Command) -> bool {
    command.output().map(|o| o.status.success()).unwrap_or(false)
}

fn output(command: &mut Command) -> String {
    command.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} loads eBPF programs and manages cgroups: run it as root");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    let mut cargo = cargo();
    cargo.current_dir(root).args(["build", "--package", "tollgate"]);
    if release {
        cargo.arg("--release");
    }
    run(&mut cargo)
}

/// Cross-builds for `target` into `target/<target>/` (the linker and C
/// compiler come from `.cargo/config.toml`). The eBPF object is the same
/// for every architecture and is not built again.
fn build_for(root: &Path, release: bool, target: &str) -> anyhow::Result<()> {
    let mut cargo = cargo();
    cargo.current_dir(root).args(["build", "--package", "tollgate", "--target", target]);
    if release {
        cargo.arg("--release");
    }
    // bindgen (PostgreSQL's parser) reads the target's C headers.
    cargo.env("BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu", "--sysroot=/usr/aarch64-linux-gnu");
    run(&mut cargo)
}

/// Idempotent: each step checks before it installs.
fn setup() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]));
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain (builds the eBPF programs)");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]));
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly (the eBPF build compiles core)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
        run(cargo().args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force"]).args([
            "--no-default-features",
            "--features",
            "rust-llvm-22",
        ]))?;
    }
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]));
    if !targets.lines().any(|line| line.trim() == ARM64) {
        eprintln!("xtask: adding the {ARM64} standard library (arm64 builds)");
        run(Command::new("rustup").args(["target", "add", ARM64]))?;
    }
    // The arm64 kernels and busybox of the kernel matrix are arm64 packages.
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"));
    let mut fresh_lists = false;
    if !foreign.lines().any(|line| line.trim() == "arm64") {
        eprintln!("xtask: adding arm64 to dpkg's architectures (the arm64 kernel matrix)");
        run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        fresh_lists = true;
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(ARM64_PACKAGES)
        .filter(|(present, _)| !succeeds(Command::new("sh").args(["-c", present])))
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing {}", missing.join(" "));
        if !fresh_lists {
            run(Command::new("apt-get").arg("update").arg("-q"))?;
        }
        let guard = !Path::new(POLICY_RC_D).exists();
        if guard {
            std::fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n").context("cannot write policy-rc.d")?;
            std::fs::set_permissions(POLICY_RC_D, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let installed = run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing));
        if guard {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
        installed?;
    }
    Ok(())
}
