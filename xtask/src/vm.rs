//! The kernel matrix: the real daemon and programs on stock Debian kernels,
//! booted in QEMU under software emulation with an initramfs of busybox,
//! the tollgate binary and the suite in `tests/vm/`.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A boot that has not powered off by then is killed and reported as hung.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// The LSM order Debian kernels boot with, plus BPF.
const LSM_WITH_BPF: &str = "lockdown,capability,landlock,yama,apparmor,bpf";
const LSM_WITHOUT_BPF: &str = "lockdown,capability,landlock,yama,apparmor";

struct Entry {
    label: &'static str,
    /// `apt-cache search --names-only` pattern for the kernel package.
    package: &'static str,
    lsm: &'static str,
    /// The exec enforcement mode the daemon must report.
    expect: &'static str,
}

const MATRIX: [Entry; 3] = [
    Entry { label: "debian-12-6.1", package: r"^linux-image-6\.1\.0-[0-9]+-amd64$", lsm: LSM_WITH_BPF, expect: "lsm" },
    Entry {
        label: "debian-12-6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        lsm: LSM_WITH_BPF,
        expect: "lsm",
    },
    // Feature detection the other way: the same kernel without BPF LSM
    // must fall back to kill-on-exec and still deny.
    Entry {
        label: "debian-12-6.12-no-bpf-lsm",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        lsm: LSM_WITHOUT_BPF,
        expect: "kill-on-exec",
    },
];

/// Runs the suite on every kernel of the matrix and reports per kernel and check.
pub fn run(root: &Path) -> anyhow::Result<()> {
    let work = root.join("target/vm");
    std::fs::create_dir_all(&work)?;
    let initramfs = build_initramfs(root, &work)?;
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for entry in &MATRIX {
        let kernel =
            kernel(&work, entry.package).with_context(|| format!("cannot get the kernel for {}", entry.label))?;
        eprintln!("xtask: booting {} ({})", entry.label, kernel.display());
        let started = Instant::now();
        let outcome = boot(&kernel, &initramfs, entry)?;
        let seconds = started.elapsed().as_secs();
        for (check, result) in &outcome.checks {
            report.push(format!("{:<28} {:<36} {}", entry.label, check, result));
            if result != "PASS" {
                failures.push(format!("{} {check}: {result}", entry.label));
            }
        }
        match (&outcome.hung, outcome.done, outcome.checks.is_empty()) {
            (true, _, _) => failures.push(format!("{}: hung (killed after {} s)", entry.label, BOOT_LIMIT.as_secs())),
            (false, false, _) => failures.push(format!("{}: the suite did not finish", entry.label)),
            (false, true, true) => failures.push(format!("{}: the suite ran no check", entry.label)),
            _ => {}
        }
        report.push(format!("{:<28} {:<36} {} s, mode {}", entry.label, "(boot)", seconds, outcome.mode));
        if !failures.is_empty() && outcome.checks.is_empty() {
            eprintln!("--- {} console ---\n{}", entry.label, outcome.console_tail);
        }
    }
    println!("kernel matrix:");
    for line in &report {
        println!("  {line}");
    }
    let passed = report.iter().filter(|l| l.ends_with("PASS")).count();
    println!("vm: {passed} passed, {} failed", failures.len());
    if !failures.is_empty() {
        bail!("kernel matrix failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// The newest package matching `pattern`, downloaded and unpacked once.
fn kernel(work: &Path, pattern: &str) -> anyhow::Result<PathBuf> {
    let search = || -> anyhow::Result<Vec<String>> {
        let found = Command::new("apt-cache").args(["search", "--names-only", pattern]).output()?;
        Ok(String::from_utf8_lossy(&found.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
            .collect())
    };
    let mut names = search()?;
    if names.is_empty() {
        // A fresh machine may have no package lists yet.
        crate::run(Command::new("apt-get").args(["update", "-q"]))?;
        names = search()?;
    }
    names.sort_by_key(|a| version_key(a));
    let package = names.pop().with_context(|| format!("no package matches {pattern} (run apt-get update)"))?;
    let dir = work.join("kernels").join(&package);
    if let Some(vmlinuz) = find_vmlinuz(&dir) {
        return Ok(vmlinuz);
    }
    let downloads = work.join("downloads");
    std::fs::create_dir_all(&downloads)?;
    crate::run(Command::new("apt-get").arg("download").arg(&package).current_dir(&downloads))?;
    let deb = std::fs::read_dir(&downloads)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{package}_"))))
        .context("apt-get download left no .deb")?;
    std::fs::create_dir_all(&dir)?;
    crate::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
    let _ = std::fs::remove_file(&deb);
    find_vmlinuz(&dir).context("the package has no boot/vmlinuz")
}

fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
}

/// busybox, the tollgate binary (debug info stripped) with its libraries,
/// and the project's init and suite.
fn build_initramfs(root: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let tree = work.join("initramfs");
    let _ = std::fs::remove_dir_all(&tree);
    for dir in ["bin", "sbin", "usr/bin", "proc", "sys", "dev", "tmp", "run", "etc", "lib64", "lib/x86_64-linux-gnu"] {
        std::fs::create_dir_all(tree.join(dir))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).context("busybox-static is not installed")?;
    let binary = root.join("target/debug/tollgate");
    crate::run(Command::new("objcopy").arg("--strip-debug").arg(&binary).arg(tree.join("bin/tollgate")))?;
    let ldd = Command::new("ldd").arg(&binary).output().context("cannot run ldd")?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let library = line.split("=>").nth(1).unwrap_or(line).split_whitespace().next().unwrap_or("");
        if library.starts_with('/') {
            let target = tree.join(library.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(library, &target).with_context(|| format!("cannot copy {library}"))?;
        }
    }
    std::fs::copy(root.join("tests/vm/init"), tree.join("init"))?;
    std::fs::copy(root.join("tests/vm/suite.sh"), tree.join("suite.sh"))?;
    let image = work.join("initramfs.cpio.gz");
    let script =
        format!("cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'", tree.display(), image.display());
    crate::run(Command::new("sh").arg("-c").arg(script))?;
    Ok(image)
}

struct Outcome {
    checks: Vec<(String, String)>,
    done: bool,
    hung: bool,
    mode: String,
    console_tail: String,
}

fn boot(kernel: &Path, initramfs: &Path, entry: &Entry) -> anyhow::Result<Outcome> {
    let append = format!("console=ttyS0 panic=-1 quiet lsm={} tollgate.expect={}", entry.lsm, entry.expect);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "2048",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(append)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let stdout = qemu.stdout.take().context("no qemu stdout")?;
    let (lines, console) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_LIMIT;
    let mut outcome =
        Outcome { checks: Vec::new(), done: false, hung: false, mode: "?".into(), console_tail: String::new() };
    let mut tail: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match console.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                if let Some(rest) = line.split("TOLLGATE-VM: ").nth(1) {
                    eprintln!("  {} | {rest}", entry.label);
                    if let Some(name) = rest.strip_prefix("PASS ") {
                        outcome.checks.push((name.to_owned(), "PASS".into()));
                    } else if let Some(failure) = rest.strip_prefix("FAIL ") {
                        let (name, why) = failure.split_once(": ").unwrap_or((failure, ""));
                        outcome.checks.push((name.to_owned(), format!("FAIL {why}")));
                    } else if let Some(mode) = rest.strip_prefix("MODE ") {
                        outcome.mode = mode.to_owned();
                    } else if rest == "DONE" {
                        outcome.done = true;
                    }
                }
                tail.push(line);
                if tail.len() > 40 {
                    tail.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome.hung = true;
                let _ = qemu.kill();
                break;
            }
        }
    }
    let _ = qemu.wait();
    outcome.console_tail = tail.join("\n");
    Ok(outcome)
}
