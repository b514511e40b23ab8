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

/// A boot that has not powered off by then is killed and reported as hung
/// (the systemd VM boots a whole distribution under emulation: it gets more).
const BOOT_LIMIT: Duration = Duration::from_secs(180);
const SYSTEMD_BOOT_LIMIT: Duration = Duration::from_secs(600);
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
        let append = format!("console=ttyS0 panic=-1 quiet lsm={} tollgate.expect={}", entry.lsm, entry.expect);
        let outcome =
            boot(&Machine { label: entry.label, kernel: &kernel, initrd: &initramfs, append, disk: None, smp: 1 })?;
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
    // The package on a real systemd host: install, start, reload, upgrade, stop, purge.
    eprintln!("xtask: booting debian-12-systemd (the .deb under systemd)");
    let started = Instant::now();
    let outcome = systemd(root, &work)?;
    for (check, result) in &outcome.checks {
        report.push(format!("{:<28} {:<36} {}", "debian-12-systemd", check, result));
        if result != "PASS" {
            failures.push(format!("debian-12-systemd {check}: {result}"));
        }
    }
    if outcome.hung || !outcome.done {
        failures
            .push(format!("debian-12-systemd: {}", if outcome.hung { "hung" } else { "the checks did not finish" }));
        eprintln!("--- debian-12-systemd console ---\n{}", outcome.console_tail);
    }
    report.push(format!("{:<28} {:<36} {} s", "debian-12-systemd", "(boot)", started.elapsed().as_secs()));
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

/// What to boot: a kernel, its initrd and command line, and a root disk if any.
struct Machine<'a> {
    label: &'a str,
    kernel: &'a Path,
    initrd: &'a Path,
    append: String,
    disk: Option<&'a Path>,
    smp: u32,
}

/// Packages of the systemd VM's root file system, besides minbase.
const SYSTEMD_ROOT_PACKAGES: &str =
    "systemd,systemd-sysv,linux-image-amd64,initramfs-tools,bpftool,kmod,udev,procps,iproute2";

/// Boots Debian 12 with systemd as init from a disk made with mmdebstrap
/// (cached per package list), with the .deb and the checks of
/// `tests/vm/systemd.sh` in it.
fn systemd(root: &Path, work: &Path) -> anyhow::Result<Outcome> {
    let deb = std::fs::read_dir(root.join("target/package"))
        .context("no target/package: cargo xtask package builds the .deb")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("no .deb in target/package")?;
    let tag: u64 = SYSTEMD_ROOT_PACKAGES
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let tarball = work.join(format!("debian-12-systemd-{tag:016x}.tar"));
    if !tarball.exists() {
        eprintln!("xtask: making the systemd VM's root file system with mmdebstrap (about a minute)");
        let partial = tarball.with_extension("partial.tar");
        crate::run(
            Command::new("mmdebstrap")
                .args(["--quiet", "--variant=minbase", &format!("--include={SYSTEMD_ROOT_PACKAGES}"), "bookworm"])
                .arg(&partial)
                .arg("http://deb.debian.org/debian"),
        )?;
        std::fs::rename(&partial, &tarball)?;
    }
    let tree = work.join("systemd-root");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree)?;
    crate::run(Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&tree))?;
    std::fs::copy(&deb, tree.join("root/tollgate.deb"))?;
    std::fs::copy(root.join("tests/vm/systemd.sh"), tree.join("root/vm-checks.sh"))?;
    std::fs::write(tree.join("etc/hostname"), "tollgate-vm\n")?;
    std::fs::write(
        tree.join("etc/systemd/system/tollgate-vm-test.service"),
        "[Unit]\nDescription=tollgate package checks\nAfter=multi-user.target\n[Service]\nType=oneshot\nExecStart=/bin/sh /root/vm-checks.sh\n[Install]\nWantedBy=multi-user.target\n",
    )?;
    // The checks write to the serial console; a getty there would hang it up under them.
    std::os::unix::fs::symlink("/dev/null", tree.join("etc/systemd/system/serial-getty@ttyS0.service"))?;
    let wants = tree.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let _ = std::fs::remove_file(wants.join("tollgate-vm-test.service"));
    std::os::unix::fs::symlink("/etc/systemd/system/tollgate-vm-test.service", wants.join("tollgate-vm-test.service"))?;
    let boot_file = |prefix: &str| -> anyhow::Result<PathBuf> {
        std::fs::read_dir(tree.join("boot"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
            .with_context(|| format!("the root file system has no /boot/{prefix}*"))
    };
    let (kernel, initrd) = (boot_file("vmlinuz-")?, boot_file("initrd.img-")?);
    let kernel_copy = work.join("systemd-vmlinuz");
    let initrd_copy = work.join("systemd-initrd.img");
    std::fs::copy(&kernel, &kernel_copy)?;
    std::fs::copy(&initrd, &initrd_copy)?;
    let disk = work.join("systemd-root.ext4");
    let _ = std::fs::remove_file(&disk);
    crate::run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "root", "-d"]).arg(&tree).arg(&disk).arg("3G"))?;
    let _ = std::fs::remove_dir_all(&tree);
    let append = format!("root=/dev/vda rw console=ttyS0 panic=-1 quiet lsm={LSM_WITH_BPF}");
    boot(&Machine {
        label: "debian-12-systemd",
        kernel: &kernel_copy,
        initrd: &initrd_copy,
        append,
        disk: Some(&disk),
        smp: 2,
    })
}

fn boot(machine: &Machine<'_>) -> anyhow::Result<Outcome> {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "2048",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-smp")
        .arg(machine.smp.to_string())
        .arg("-kernel")
        .arg(machine.kernel)
        .arg("-initrd")
        .arg(machine.initrd)
        .arg("-append")
        .arg(&machine.append);
    if let Some(disk) = machine.disk {
        command.arg("-drive").arg(format!("file={},if=virtio,format=raw", disk.display()));
    }
    let mut qemu = command
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
    let limit = if machine.disk.is_some() { SYSTEMD_BOOT_LIMIT } else { BOOT_LIMIT };
    let deadline = Instant::now() + limit;
    let mut outcome =
        Outcome { checks: Vec::new(), done: false, hung: false, mode: "?".into(), console_tail: String::new() };
    let mut tail: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match console.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                if let Some(rest) = line.split("TOLLGATE-VM: ").nth(1) {
                    eprintln!("  {} | {rest}", machine.label);
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
