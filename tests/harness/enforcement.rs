//! The policy the enforcement and isolation tests share: an egress grant for `build-bots`, with
//! the network and exec rules each test asks for.

use std::path::Path;

/// Claims that match the `build-bots` identity, which has the egress grant.
pub const BUILD_BOTS: &[(&str, &str)] = &[("repository_owner", "acme")];

pub const ALLOW_ALL: [&str; 2] = ["0.0.0.0/0", "::/0"];

/// The `build-bots` identity (dev issuer, root allowed, claims [`BUILD_BOTS`]) as a policy's
/// `identities:` section, for tests that write their own grants after it.
pub const BUILD_BOTS_IDENTITY: &str = "identities:
  - name: build-bots
    issuer: tollgate-dev
    allow_root: true
    claims: { repository_owner: acme }
";

/// A policy with two identities: `build-bots`, granted `allow`/`deny` egress and forbidden to exec
/// `exec_deny`, and `no-grant-bots`, which has no grant at all.
pub fn policy(allow: &[String], deny: &[String], exec_deny: &[&Path]) -> String {
    // JSON arrays are valid YAML flow sequences, and JSON strings need no further escaping.
    let yaml_list = |items: &[String]| serde_json::to_string(items).expect("strings serialize");
    let exec_deny: Vec<String> =
        exec_deny.iter().map(|path| path.to_str().expect("temp paths are UTF-8").to_owned()).collect();
    let exec_section = if exec_deny.is_empty() {
        String::new()
    } else {
        format!("    exec:\n      deny: {}\n", yaml_list(&exec_deny))
    };
    format!(
        r#"
identities:
  - name: build-bots
    issuer: tollgate-dev
    allow_root: true
    claims:
      repository_owner: acme
  - name: no-grant-bots
    issuer: tollgate-dev
    allow_root: true
    claims:
      repository_owner: nogrant
grants:
  - name: build-bots-egress
    identity: build-bots
{exec_section}    network:
      allow: {allow}
      deny: {deny}
"#,
        allow = yaml_list(allow),
        deny = yaml_list(deny),
    )
}

pub fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}
