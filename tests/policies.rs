//! `tollgate policy check`: the shipped policies load, and broken ones are reported with the
//! file and line of each mistake, the files given checked together.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{RunOutput, run_with_timeout, tollgate_bin, workspace_root};
use tempfile::TempDir;

/// A policy that loads; the broken ones below each change one thing in it.
const VALID: &str = r#"identities:
  - name: build-bots
    issuer: tollgate-dev
    claims:
      repository_owner: acme
grants:
  - name: build-bots-egress
    identity: build-bots
    exec:
      deny: [/usr/bin/true]
    network:
      allow: ["0.0.0.0/0", "::/0"]
      deny: ["10.0.0.0/8", "169.254.169.254/32:80"]
"#;

fn policy_check(files: &[&Path]) -> RunOutput {
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["policy", "check"]).args(files);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("running tollgate policy check: {err:#}"))
}

/// One `FILE:LINE:COL: message` diagnostic.
struct Diagnostic {
    line: u64,
    message: String,
}

/// The diagnostics on stderr that name `file`.
fn diagnostics_for(out: &RunOutput, file: &Path) -> Vec<Diagnostic> {
    let prefix = format!("{}:", file.display());
    out.stderr
        .lines()
        .filter_map(|line| {
            let mut parts = line.strip_prefix(&prefix)?.splitn(3, ':');
            let line_number = parts.next()?.parse().ok()?;
            let _column: u64 = parts.next()?.parse().ok()?;
            Some(Diagnostic { line: line_number, message: parts.next()?.trim().to_owned() })
        })
        .collect()
}

/// Writes `VALID` with `from` replaced by `to` and returns the file and the 1-based line of the
/// change.
fn write_variant(dir: &TempDir, name: &str, from: &str, to: &str) -> (PathBuf, u64) {
    assert_eq!(VALID.matches(from).count(), 1, "test bug: {from:?} must occur once in VALID");
    let text = VALID.replacen(from, to, 1);
    let line = text.lines().position(|line| line.contains(to)).expect("the replacement is in the text");
    let path = dir.path().join(name);
    fs::write(&path, text).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    (path, line as u64 + 1)
}

/// Checks that `policy check FILE` fails and has a diagnostic for `FILE` whose message mentions
/// `needle`, on `line` if given.
fn assert_rejected(path: &Path, line: Option<u64>, needle: &str) {
    let out = policy_check(&[path]);
    assert_eq!(out.code(), Some(1), "policy check should fail for {}: {out}", path.display());
    let found = diagnostics_for(&out, path)
        .into_iter()
        .any(|diagnostic| line.is_none_or(|line| diagnostic.line == line) && diagnostic.message.contains(needle));
    let place = line.map(|line| format!("{}:{line}:", path.display()));
    assert!(
        found,
        "expected a `{}COL: ...` diagnostic mentioning {needle:?}: {out}",
        place.unwrap_or_else(|| format!("{}:LINE:", path.display()))
    );
}

#[test]
fn shipped_policies_load() {
    let dir = workspace_root().join("policies");
    let entries = fs::read_dir(&dir).unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap_or_else(|err| panic!("listing {}: {err}", dir.display())).path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.yaml or *.yml policies in {}", dir.display());

    for file in &files {
        let out = policy_check(&[file]);
        assert_eq!(out.code(), Some(0), "{} does not load: {out}", file.display());
    }
}

#[test]
fn valid_policy_loads() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let path = dir.path().join("valid.yaml");
    fs::write(&path, VALID).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    let out = policy_check(&[&path]);
    assert_eq!(out.code(), Some(0), "the reference policy does not load: {out}");
}

#[test]
fn bad_cidr_is_reported_at_its_line() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (path, line) = write_variant(&dir, "bad-cidr.yaml", "10.0.0.0/8", "10.0.0.0/33");
    assert_rejected(&path, Some(line), "10.0.0.0/33");
}

#[test]
fn only_the_broken_file_is_blamed() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    // Checked together, so the valid file defines other names than the broken one.
    let valid = dir.path().join("valid.yaml");
    let other = VALID.replace("build-bots", "other-bots");
    fs::write(&valid, other).unwrap_or_else(|err| panic!("writing {}: {err}", valid.display()));
    let (broken, line) = write_variant(&dir, "bad-port.yaml", "169.254.169.254/32:80", "169.254.169.254/32:99999");

    let out = policy_check(&[&valid, &broken]);
    assert_eq!(out.code(), Some(1), "one broken file should fail the check: {out}");
    assert!(diagnostics_for(&out, &valid).is_empty(), "the valid file was blamed: {out}");
    assert!(
        diagnostics_for(&out, &broken).iter().any(|diagnostic| diagnostic.line == line),
        "expected a diagnostic for {}:{line}: {out}",
        broken.display()
    );
}

#[test]
fn grant_for_unknown_identity_is_rejected() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (path, _) = write_variant(&dir, "ghost.yaml", "identity: build-bots", "identity: ghost-bots");
    // Which line a cross-reference error points at (the grant or its `identity:`) is the
    // implementation's choice; the name must be in the message.
    assert_rejected(&path, None, "ghost-bots");
}

#[test]
fn unknown_field_is_rejected_at_its_line() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (path, line) = write_variant(&dir, "typo.yaml", "    network:", "    netwrok:");
    assert_rejected(&path, Some(line), "netwrok");
}

/// `policy check` takes files together (identities in one, grants in another), reports every
/// error it finds, each as FILE:LINE:COLUMN on one line, and warns about exec paths that do not
/// exist.
#[test]
fn check_reports_every_error_across_files_and_warns_about_missing_paths() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let identities = dir.path().join("identities.yaml");
    fs::write(&identities, "identities:\n  - name: bots\n    issuer: https://idp.example\n").expect("write");
    let grants = dir.path().join("grants.yaml");
    fs::write(
        &grants,
        "grants:\n  - name: one\n    identity: bots\n    network: { allow: [\"10.0.0.0/33\"] }\n  - name: two\n    identity: bots\n    netwrok: {}\n  - name: three\n    identity: ghost\n",
    )
    .expect("write");
    let out = policy_check(&[&identities, &grants]);
    assert_eq!(out.code(), Some(1), "{out}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    let g = grants.display().to_string();
    assert!(lines.iter().any(|l| l.starts_with(&format!("{g}:4:")) && l.contains("10.0.0.0/33")), "{out}");
    assert!(lines.iter().any(|l| l.starts_with(&format!("{g}:5:")) && l.contains("netwrok")), "{out}");
    assert!(lines.iter().any(|l| l.starts_with(&format!("{g}:9:")) && l.contains("ghost")), "{out}");

    // Split across files, a sound policy passes; a missing exec path is a warning, not an error.
    let sound = dir.path().join("sound.yaml");
    fs::write(&sound, "grants:\n  - name: four\n    identity: bots\n    exec: { deny: [/nonexistent/tool] }\n")
        .expect("write");
    let out = policy_check(&[&identities, &sound]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stderr.lines().any(|l| l.starts_with(&format!("{}:2:", sound.display()))
            && l.contains("warning")
            && l.contains("/nonexistent/tool")),
        "{out}"
    );
}
