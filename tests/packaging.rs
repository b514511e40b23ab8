//! What SREs install: the systemd unit is sandboxed as far as the daemon's work allows, scored by
//! `systemd-analyze security`, and says why for each protection it cannot use.

use std::process::Command;
use std::time::Duration;

use harness::{run_with_timeout, workspace_root};

/// `systemd-analyze security` rates the unit at most 5.0 ("OK"), and every protection it turns
/// off or leaves at a weaker setting is explained by a comment right above it.
#[test]
fn the_unit_is_hardened_and_explains_what_it_cannot_use() {
    let unit = workspace_root().join("packaging/systemd/tollgate.service");
    let mut analyze = std::process::Command::new("systemd-analyze");
    analyze.args(["security", "--offline=true"]).arg(&unit);
    let out = run_with_timeout(&mut analyze, Duration::from_secs(60)).expect("systemd-analyze runs");
    let score: f64 = out
        .stdout
        .lines()
        .find_map(|l| l.split("Overall exposure level for tollgate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level: {out}"));
    assert!(score <= 5.0, "exposure {score} is above 5.0: {out}");

    let text = std::fs::read_to_string(&unit).expect("the unit");
    let lines: Vec<&str> = text.lines().collect();
    let weakened = ["=no", "ProtectProc=default"];
    for (index, line) in lines.iter().enumerate() {
        if weakened.iter().any(|w| line.ends_with(w)) {
            assert!(index > 0 && lines[index - 1].starts_with('#'), "`{line}` has no comment saying why:\n{text}");
        }
    }
    for needed in [
        "Type=notify",
        "ExecReload=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
    ] {
        assert!(text.contains(needed), "the unit lacks {needed}");
    }
}

/// The package in `target/package` whose name ends with `ending` (`_amd64.deb`, `.aarch64.rpm`).
fn package(ending: &str) -> std::path::PathBuf {
    let dir = workspace_root().join("target/package");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!("{}: {e} (cargo xtask package builds the packages; cargo xtask test runs it)", dir.display())
        })
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(ending)))
        .unwrap_or_else(|| panic!("no *{ending} in {} (cargo xtask package builds it)", dir.display()))
}

/// The ELF machine of the file at `path` inside a package's files (`EM_X86_64` 62, `EM_AARCH64` 183).
fn elf_machine(path: &std::path::Path) -> u16 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not an ELF file", path.display());
    u16::from_le_bytes([bytes[18], bytes[19]])
}

fn run(program: &str, args: &[&str]) -> harness::RunOutput {
    let mut command = std::process::Command::new(program);
    command.args(args);
    run_with_timeout(&mut command, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// The .deb holds the binary, the unit, the config kept on upgrade, completions and man pages;
/// its scripts hand sessions over on upgrade and stop cleanly on removal; lintian finds nothing
/// but what the package's overrides explain.
#[test]
fn the_deb_holds_what_an_sre_expects_and_lints_clean() {
    let deb = package("_amd64.deb");
    let deb = deb.to_str().expect("UTF-8 path");
    let contents = run("dpkg-deb", &["-c", deb]);
    for path in [
        "./usr/bin/tollgate",
        "./lib/systemd/system/tollgate.service",
        "./etc/tollgate/config.yaml",
        "./etc/tollgate/policies/README",
        "./usr/share/bash-completion/completions/tollgate",
        "./usr/share/zsh/vendor-completions/_tollgate",
        "./usr/share/fish/vendor_completions.d/tollgate.fish",
        "./usr/share/man/man1/tollgate.1.gz",
        "./usr/share/man/man1/tollgate-run.1.gz",
        "./usr/share/doc/tollgate/copyright",
    ] {
        assert!(contents.stdout.lines().any(|l| l.ends_with(path)), "{path} is not in the package:\n{contents}");
    }
    let scratch = tempfile::tempdir().expect("temp dir");
    let control = scratch.path().join("control");
    assert!(run("dpkg-deb", &["-e", deb, control.to_str().expect("path")]).success());
    let conffiles = std::fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert!(conffiles.lines().any(|l| l == "/etc/tollgate/config.yaml"), "{conffiles}");
    let prerm = std::fs::read_to_string(control.join("prerm")).expect("prerm");
    assert!(prerm.contains("upgrade)") && prerm.contains("SIGUSR2"), "upgrades hand sessions over:\n{prerm}");
    let postrm = std::fs::read_to_string(control.join("postrm")).expect("postrm");
    assert!(postrm.contains("purge)") && postrm.contains("/var/lib/tollgate"), "{postrm}");
    let lint = run("lintian", &[deb]);
    let findings: Vec<&str> = lint.stdout.lines().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect();
    assert!(lint.success() && findings.is_empty(), "lintian: {lint}");

    // The packaged binary starts cleanly on the packaged config (paths moved into a scratch
    // directory) and trusts no issuer until one is added.
    let root = scratch.path().join("root");
    assert!(run("dpkg-deb", &["-x", deb, root.to_str().expect("path")]).success());
    let config = std::fs::read_to_string(root.join("etc/tollgate/config.yaml")).expect("config");
    assert!(config.contains("issuers: []") && config.contains("dev_issuer: false"), "{config}");
    let state = scratch.path().join("state");
    let socket = scratch.path().join("control.sock");
    let moved = config
        .replace("/var/lib/tollgate", state.to_str().expect("path"))
        .replace("/run/tollgate/control.sock", socket.to_str().expect("path"))
        .replace("/etc/tollgate/policies", root.join("etc/tollgate/policies").to_str().expect("path"))
        + &format!(
            "cgroup: tollgate-package-{}\nproxy_port: {}\n",
            std::process::id(),
            harness::free_loopback_port().expect("port")
        );
    let moved_config = scratch.path().join("config.yaml");
    std::fs::write(&moved_config, moved).expect("config");
    let binary = root.join("usr/bin/tollgate");
    assert_eq!(elf_machine(&binary), 62, "the amd64 .deb's binary is not x86_64");
    let mut daemon = std::process::Command::new(&binary)
        .args(["daemon", "--config"])
        .arg(&moved_config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the packaged daemon starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = run(
            binary.to_str().expect("path"),
            &["--socket", socket.to_str().expect("path"), "status", "--format", "json"],
        );
        if out.success() {
            break out;
        }
        assert!(std::time::Instant::now() < deadline, "the packaged daemon did not answer: {out}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // SAFETY: SIGTERM to the daemon this test started.
    unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
    let exited = daemon.wait().expect("the daemon stops");
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(status["dev_issuer"], false);
    assert!(exited.success(), "the packaged daemon did not stop cleanly: {exited}");
}

/// The .rpm lists the same files and its scripts, marks the config as a config file, and
/// installs into a scratch root.
#[test]
fn the_rpm_lists_its_files_and_scripts_and_installs_into_a_scratch_root() {
    let rpm = package(".x86_64.rpm");
    let rpm = rpm.to_str().expect("UTF-8 path");
    let files = run("rpm", &["-qlp", rpm]);
    for path in [
        "/usr/bin/tollgate",
        "/usr/lib/systemd/system/tollgate.service",
        "/etc/tollgate/config.yaml",
        "/usr/share/man/man1/tollgate.1.gz",
    ] {
        assert!(files.stdout.lines().any(|l| l == path), "{path} is not in the rpm: {files}");
    }
    let configs = run("rpm", &["-qp", "--configfiles", rpm]);
    assert!(configs.stdout.lines().any(|l| l == "/etc/tollgate/config.yaml"), "{configs}");
    let scripts = run("rpm", &["-qp", "--scripts", rpm]);
    assert!(
        scripts.stdout.contains("postinstall scriptlet") && scripts.stdout.contains("preuninstall scriptlet"),
        "{scripts}"
    );
    assert!(scripts.stdout.contains("SIGUSR2"), "upgrades hand sessions over: {scripts}");
    rpm_upgrade_hands_over_then_starts(&scripts.stdout);
    let root = tempfile::tempdir().expect("temp dir");
    let root_arg = root.path().to_str().expect("path");
    assert!(run("rpm", &["--root", root_arg, "--initdb"]).success());
    let install = run("rpm", &["--root", root_arg, "-i", "--nodeps", "--noscripts", rpm]);
    assert!(install.success(), "{install}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.path().join("usr/bin/tollgate")).expect("installed binary").permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(root.path().join("etc/tollgate/config.yaml").exists());
    let query = run("rpm", &["--root", root_arg, "-q", "tollgate"]);
    assert!(query.success() && query.stdout.starts_with("tollgate-0.1.0"), "{query}");
}

/// The arm64 packages hold the same files as the amd64 ones, with an arm64 binary, and say so in
/// their architecture; the .deb lints clean too.
#[test]
fn arm64_packages_hold_the_same_files_with_an_arm64_binary() {
    let (deb, native_deb) = (package("_arm64.deb"), package("_amd64.deb"));
    let list = |deb: &std::path::Path| -> Vec<String> {
        let out = run("dpkg-deb", &["-c", deb.to_str().expect("path")]);
        let mut paths: Vec<String> =
            out.stdout.lines().filter_map(|l| l.split_whitespace().last().map(str::to_owned)).collect();
        paths.sort();
        paths
    };
    assert_eq!(list(&deb), list(&native_deb), "the two .debs hold different files");
    let deb = deb.to_str().expect("path");
    let arch = run("dpkg-deb", &["-f", deb, "Architecture"]);
    assert_eq!(arch.stdout.trim(), "arm64", "{arch}");
    let scratch = tempfile::tempdir().expect("temp dir");
    assert!(run("dpkg-deb", &["-x", deb, scratch.path().to_str().expect("path")]).success());
    assert_eq!(elf_machine(&scratch.path().join("usr/bin/tollgate")), 183, "the arm64 .deb's binary is not arm64");
    let lint = run("lintian", &[deb]);
    let findings: Vec<&str> = lint.stdout.lines().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect();
    assert!(lint.success() && findings.is_empty(), "lintian: {lint}");

    let rpm = package(".aarch64.rpm");
    let rpm = rpm.to_str().expect("path");
    let arch = run("rpm", &["-qp", "--queryformat", "%{ARCH}", rpm]);
    assert_eq!(arch.stdout.trim(), "aarch64", "{arch}");
    let native = package(".x86_64.rpm");
    let (files, native_files) = (run("rpm", &["-qlp", rpm]), run("rpm", &["-qlp", native.to_str().expect("path")]));
    assert_eq!(files.stdout, native_files.stdout, "the two .rpms hold different files");
    let root = tempfile::tempdir().expect("temp dir");
    let root_arg = root.path().to_str().expect("path");
    assert!(run("rpm", &["--root", root_arg, "--initdb"]).success());
    let install = run("rpm", &["--root", root_arg, "-i", "--nodeps", "--noscripts", "--ignorearch", rpm]);
    assert!(install.success(), "{install}");
    assert_eq!(elf_machine(&root.path().join("usr/bin/tollgate")), 183, "the aarch64 .rpm's binary is not arm64");
}

/// The scriptlet named `name` in `rpm -qp --scripts` output.
fn scriptlet(scripts: &str, name: &str) -> String {
    let header = format!("{name} scriptlet");
    let mut lines = scripts.lines().skip_while(|l| !l.starts_with(&header)).skip(1);
    let mut body = Vec::new();
    for line in lines.by_ref() {
        if line.ends_with("scriptlet (using /bin/sh):") {
            break;
        }
        body.push(line);
    }
    assert!(!body.is_empty(), "no {name} scriptlet in: {scripts}");
    body.join("\n")
}

/// rpm runs an upgrade as: the new package's %post, then the old package's %preun. The systemd
/// host an rpm would run on is not here, so the scriptlets run in that order under a stand-in
/// `systemctl` that keeps the service's state and logs each call: the running daemon is handed
/// over (SIGUSR2) and the new one started, and the old %preun does not stop it again.
fn rpm_upgrade_hands_over_then_starts(scripts: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, active) = (dir.path().join("calls"), dir.path().join("active"));
    std::fs::write(&active, "").expect("the service runs");
    let stand_in = dir.path().join("systemctl");
    std::fs::write(
        &stand_in,
        format!(
            r#"#!/bin/sh
echo "$*" >> {log}
case "$*" in
*is-active*) test -e {active} ;;
*SIGUSR2*|*stop*|*disable*) rm -f {active} ;;
*start*) touch {active} ;;
esac
"#,
            log = log.display(),
            active = active.display()
        ),
    )
    .expect("stand-in systemctl");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The scriptlets create their directories under / and check /run/systemd/system: point them at scratch paths.
    let rewrite = |body: String| {
        body.replace("/var/lib/tollgate", &dir.path().join("state").display().to_string())
            .replace("/etc/tollgate", &dir.path().join("etc").display().to_string())
            .replace("/run/systemd/system", &dir.path().display().to_string())
    };
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
    for (name, arg) in [("postinstall", "2"), ("preuninstall", "1")] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(rewrite(scriptlet(scripts, name)))
            .arg("sh")
            .arg(arg)
            .env("PATH", &path)
            .output()
            .expect("sh runs the scriptlet");
        assert!(out.status.success(), "{name} {arg}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let calls = std::fs::read_to_string(&log).expect("systemctl was called");
    let handover = calls.find("SIGUSR2").unwrap_or_else(|| panic!("no handover on upgrade: {calls}"));
    let start = calls.rfind("start tollgate.service").unwrap_or_else(|| panic!("no start on upgrade: {calls}"));
    assert!(handover < start, "the new daemon starts after the old one handed over: {calls}");
    assert!(!calls.contains("stop") && !calls.contains("disable"), "the upgrade stopped the service: {calls}");
    assert!(active.exists(), "the service is left running after the upgrade: {calls}");
}
