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
/// (the systemd VM boots a whole distribution under emulation, and an arm64
/// guest is emulated instruction by instruction: they get more).
const BOOT_LIMIT: Duration = Duration::from_secs(180);
const ARM64_BOOT_LIMIT: Duration = Duration::from_secs(600);
const SYSTEMD_BOOT_LIMIT: Duration = Duration::from_secs(600);
/// The LSM order Debian kernels boot with, plus BPF.
const LSM_WITH_BPF: &str = "lockdown,capability,landlock,yama,apparmor,bpf";
const LSM_WITHOUT_BPF: &str = "lockdown,capability,landlock,yama,apparmor";

/// The machine a kernel of the matrix boots on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Debian's name for it (packages are `name:arch`).
    fn debian(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// The emulator and the machine and console it offers.
    fn qemu(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            Self::Amd64 => ("qemu-system-x86_64", &["-cpu", "max"], "ttyS0"),
            // pauth-impdef: the same pointer authentication, with a hash TCG computes fast.
            Self::Arm64 => ("qemu-system-aarch64", &["-M", "virt", "-cpu", "max,pauth-impdef=on"], "ttyAMA0"),
        }
    }

    fn boot_limit(self) -> Duration {
        match self {
            Self::Amd64 => BOOT_LIMIT,
            Self::Arm64 => ARM64_BOOT_LIMIT,
        }
    }
}

struct Entry {
    label: &'static str,
    arch: Arch,
    /// `apt-cache search --names-only` pattern for the kernel package.
    package: &'static str,
    lsm: &'static str,
    /// The exec enforcement mode the daemon must report.
    expect: &'static str,
}

const MATRIX: [Entry; 6] = [
    Entry {
        label: "debian-12-6.1",
        arch: Arch::Amd64,
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        lsm: LSM_WITH_BPF,
        expect: "lsm",
    },
    Entry {
        label: "debian-12-6.12",
        arch: Arch::Amd64,
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        lsm: LSM_WITH_BPF,
        expect: "lsm",
    },
    // Feature detection the other way: the same kernel without BPF LSM
    // must fall back to kill-on-exec and still deny.
    Entry {
        label: "debian-12-6.12-no-bpf-lsm",
        arch: Arch::Amd64,
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        lsm: LSM_WITHOUT_BPF,
        expect: "kill-on-exec",
    },
    // The flavour cloud images boot (fewer drivers, the same BPF).
    Entry {
        label: "debian-12-6.1-cloud",
        arch: Arch::Amd64,
        package: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$",
        lsm: LSM_WITH_BPF,
        expect: "lsm",
    },
    // Booted with BPF LSM, but arm64 6.1 cannot attach it (no BPF trampoline
    // for LSM hooks there): the daemon must notice and fall back.
    Entry {
        label: "debian-12-arm64-6.1",
        arch: Arch::Arm64,
        package: r"^linux-image-6\.1\.0-[0-9]+-arm64$",
        lsm: LSM_WITH_BPF,
        expect: "kill-on-exec",
    },
    Entry {
        label: "debian-12-arm64-6.12",
        arch: Arch::Arm64,
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-arm64$",
        lsm: LSM_WITH_BPF,
        expect: "lsm",
    },
];

/// The systemd VM's label.
const SYSTEMD_LABEL: &str = "debian-12-systemd";

/// Runs the suite on every kernel of the matrix (or those `only` names) and
/// reports per kernel and check.
pub fn run(root: &Path, only: &[String]) -> anyhow::Result<()> {
    let known: Vec<&str> = MATRIX.iter().map(|e| e.label).chain([SYSTEMD_LABEL]).collect();
    if let Some(unknown) = only.iter().find(|label| !known.contains(&label.as_str())) {
        bail!("no machine '{unknown}' in the matrix (known: {})", known.join(", "));
    }
    let chosen = |label: &str| only.is_empty() || only.iter().any(|l| l == label);
    let work = root.join("target/vm");
    std::fs::create_dir_all(&work)?;
    let mut initramfs = Vec::new();
    for arch in [Arch::Amd64, Arch::Arm64] {
        if MATRIX.iter().any(|e| e.arch == arch && chosen(e.label)) {
            initramfs.push((arch, build_initramfs(root, &work, arch)?));
        }
    }
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for entry in MATRIX.iter().filter(|e| chosen(e.label)) {
        let kernel = kernel(&work, entry.package, entry.arch)
            .with_context(|| format!("cannot get the kernel for {}", entry.label))?;
        let initrd = &initramfs.iter().find(|(arch, _)| *arch == entry.arch).expect("an initramfs per arch").1;
        eprintln!("xtask: booting {} ({})", entry.label, kernel.display());
        let started = Instant::now();
        let console = entry.arch.qemu().2;
        let append = format!("console={console} panic=-1 quiet lsm={} tollgate.expect={}", entry.lsm, entry.expect);
        // An emulated arm64 guest runs its two vCPUs on the host's two cores.
        let smp = if entry.arch == Arch::Arm64 { 2 } else { 1 };
        let outcome =
            boot(&Machine { label: entry.label, arch: entry.arch, kernel: &kernel, initrd, append, disk: None, smp })?;
        let seconds = started.elapsed().as_secs();
        for (check, result) in &outcome.checks {
            report.push(format!("{:<28} {:<36} {}", entry.label, check, result));
            if result != "PASS" {
                failures.push(format!("{} {check}: {result}", entry.label));
            }
        }
        match (&outcome.hung, outcome.done, outcome.checks.is_empty()) {
            (true, _, _) => {
                failures.push(format!("{}: hung (killed after {} s)", entry.label, entry.arch.boot_limit().as_secs()))
            }
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
    if chosen(SYSTEMD_LABEL) {
        systemd_report(root, &work, &mut report, &mut failures)?;
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

/// Boots the systemd VM and adds its checks to the report.
fn systemd_report(
    root: &Path,
    work: &Path,
    report: &mut Vec<String>,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    eprintln!("xtask: booting debian-12-systemd (the .deb under systemd)");
    let started = Instant::now();
    let outcome = systemd(root, work)?;
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
    Ok(())
}

/// The newest package matching `pattern`, downloaded and unpacked once.
fn kernel(work: &Path, pattern: &str, arch: Arch) -> anyhow::Result<PathBuf> {
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
    crate::run(
        Command::new("apt-get").arg("download").arg(format!("{package}:{}", arch.debian())).current_dir(&downloads),
    )?;
    let deb = std::fs::read_dir(&downloads)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{package}_"))))
        .context("apt-get download left no .deb")?;
    std::fs::create_dir_all(&dir)?;
    let unpacked = unpack_kernel_image(&deb, &dir);
    let _ = std::fs::remove_file(&deb);
    unpacked?;
    find_vmlinuz(&dir).context("the package has no boot/vmlinuz")
}

/// Only the kernel image: the VMs load no modules, and a package's modules
/// take hundreds of MB of the disk the build shares.
fn unpack_kernel_image(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut contents = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run dpkg-deb")?;
    let tarfile = contents.stdout.take().context("dpkg-deb gave no output pipe")?;
    let unpacked = crate::run(
        Command::new("tar").args(["-x", "--wildcards", "-C"]).arg(dir).arg("./boot/vmlinuz-*").stdin(tarfile),
    );
    let listed = contents.wait()?;
    unpacked?;
    anyhow::ensure!(listed.success(), "dpkg-deb --fsys-tarfile {} failed with {listed}", deb.display());
    Ok(())
}

/// A Debian package's files, unpacked once under `work/packages`.
fn unpacked(work: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let dir = work.join("packages").join(package.replace(':', "_"));
    if dir.join(".done").exists() {
        return Ok(dir);
    }
    let downloads = work.join("downloads");
    std::fs::create_dir_all(&downloads)?;
    let before: Vec<_> = std::fs::read_dir(&downloads)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    crate::run(Command::new("apt-get").arg("download").arg(package).current_dir(&downloads))?;
    let deb = std::fs::read_dir(&downloads)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| !before.contains(p) && p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    crate::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
    let _ = std::fs::remove_file(&deb);
    std::fs::write(dir.join(".done"), "")?;
    Ok(dir)
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
/// and the project's init and suite, for `arch`: the host's debug build for
/// amd64; for arm64 the cross-built release binary (emulated, every
/// instruction counts), Debian's arm64 busybox and the cross libc.
fn build_initramfs(root: &Path, work: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let tree = work.join(format!("initramfs-{}", arch.debian()));
    let _ = std::fs::remove_dir_all(&tree);
    for dir in ["bin", "sbin", "usr/bin", "proc", "sys", "dev", "tmp", "run", "etc", "lib", "lib64"] {
        std::fs::create_dir_all(tree.join(dir))?;
    }
    let libraries = match arch {
        Arch::Amd64 => {
            std::fs::copy("/bin/busybox", tree.join("bin/busybox")).context("busybox-static is not installed")?;
            let binary = root.join("target/debug/tollgate");
            crate::run(Command::new("objcopy").arg("--strip-debug").arg(&binary).arg(tree.join("bin/tollgate")))?;
            let ldd = Command::new("ldd").arg(&binary).output().context("cannot run ldd")?;
            String::from_utf8_lossy(&ldd.stdout)
                .lines()
                .filter_map(|line| line.split("=>").nth(1).unwrap_or(line).split_whitespace().next())
                .filter(|library| library.starts_with('/'))
                .map(PathBuf::from)
                .map(|path| (path.clone(), path))
                .collect::<Vec<_>>()
        }
        Arch::Arm64 => {
            let busybox = unpacked(work, "busybox-static:arm64")?.join("bin/busybox");
            std::fs::copy(&busybox, tree.join("bin/busybox"))
                .with_context(|| format!("cannot copy {}", busybox.display()))?;
            let binary = root.join("target").join(crate::ARM64).join("release/tollgate");
            crate::run(
                Command::new("aarch64-linux-gnu-strip")
                    .arg("--strip-debug")
                    .arg(&binary)
                    .arg("-o")
                    .arg(tree.join("bin/tollgate")),
            )?;
            cross_libraries(&binary, Path::new("/usr/aarch64-linux-gnu/lib"))?
        }
    };
    for (source, inside) in libraries {
        let target = tree.join(inside.strip_prefix("/").unwrap_or(&inside));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&source, &target).with_context(|| format!("cannot copy {}", source.display()))?;
    }
    std::fs::copy(root.join("tests/vm/init"), tree.join("init"))?;
    std::fs::copy(root.join("tests/vm/suite.sh"), tree.join("suite.sh"))?;
    let image = work.join(format!("initramfs-{}.cpio.gz", arch.debian()));
    let script =
        format!("cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'", tree.display(), image.display());
    crate::run(Command::new("sh").arg("-c").arg(script))?;
    Ok(image)
}

/// A cross-built binary's interpreter and libraries (its `NEEDED`, and
/// theirs), found in `sysroot_lib`: (where it is here, where it goes).
fn cross_libraries(binary: &Path, sysroot_lib: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let dynamic = |file: &Path| -> anyhow::Result<String> {
        let out = Command::new("aarch64-linux-gnu-readelf").arg("-d").arg("-l").arg(file).output()?;
        anyhow::ensure!(out.status.success(), "readelf cannot read {}", file.display());
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let text = dynamic(binary)?;
    let interpreter = text
        .lines()
        .find_map(|line| line.split("[Requesting program interpreter: ").nth(1))
        .and_then(|rest| rest.strip_suffix(']'))
        .context("the binary names no interpreter")?
        .to_owned();
    let name = Path::new(&interpreter).file_name().context("interpreter path")?;
    let mut found = vec![(sysroot_lib.join(name), PathBuf::from(&interpreter))];
    let mut queue = vec![text];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(text) = queue.pop() {
        for needed in text.lines().filter_map(|l| l.split("Shared library: [").nth(1)?.strip_suffix(']')) {
            if !seen.insert(needed.to_owned()) {
                continue;
            }
            let source = sysroot_lib.join(needed);
            queue.push(dynamic(&source)?);
            found.push((source, Path::new("/lib/aarch64-linux-gnu").join(needed)));
        }
    }
    Ok(found)
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
    arch: Arch,
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
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("_amd64.deb")))
        .context("no amd64 .deb in target/package")?;
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
    let outcome = boot(&Machine {
        label: "debian-12-systemd",
        arch: Arch::Amd64,
        kernel: &kernel_copy,
        initrd: &initrd_copy,
        append,
        disk: Some(&disk),
        smp: 2,
    });
    // Made anew at every run: 800 MB of disk that nothing reads again.
    let _ = std::fs::remove_file(&disk);
    outcome
}

fn boot(machine: &Machine<'_>) -> anyhow::Result<Outcome> {
    let (emulator, cpu, _) = machine.arch.qemu();
    let mut command = Command::new(emulator);
    command
        .args(cpu)
        .args(["-accel", "tcg", "-m", "2048", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
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
        .with_context(|| format!("cannot start {emulator}"))?;
    let stdout = qemu.stdout.take().context("no qemu stdout")?;
    let (lines, console) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let limit = if machine.disk.is_some() { SYSTEMD_BOOT_LIMIT } else { machine.arch.boot_limit() };
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
