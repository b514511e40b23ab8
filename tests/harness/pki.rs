//! A throwaway certificate authority and a server certificate it signed,
//! made with the openssl CLI, for TLS servers the tests start.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::run_with_timeout;

/// `ca.pem` and a leaf `cert.pem` / `key.pem` for the names given, in a directory.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// Makes them in `dir`; `san` is the leaf's subjectAltName (`DNS:a.test,IP:127.0.0.1`).
    pub fn new(dir: &Path, san: &str) -> Pki {
        let path = |name: &str| dir.join(name);
        let p = |name: &str| path(name).display().to_string();
        // A CA and a leaf it signed: TLS libraries refuse a CA certificate
        // used as a server's own.
        fs::write(path("leaf.ext"), format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"))
            .expect("extension file");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca_step: Vec<String> = ["req", "-x509"].iter().chain(&ec).map(|s| (*s).to_owned()).collect();
        ca_step.extend(
            ["-days", "2", "-subj", "/CN=tollgate test CA", "-keyout", &p("ca.key"), "-out", &p("ca.pem")]
                .map(String::from),
        );
        let mut leaf_step: Vec<String> = ["req"].iter().chain(&ec).map(|s| (*s).to_owned()).collect();
        leaf_step.extend(
            ["-subj", "/CN=tollgate test server", "-keyout", &p("key.pem"), "-out", &p("leaf.csr")].map(String::from),
        );
        let sign_step: Vec<String> = [
            "x509",
            "-req",
            "-in",
            &p("leaf.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p("leaf.ext"),
            "-out",
            &p("cert.pem"),
        ]
        .map(String::from)
        .to_vec();
        for step in [ca_step, leaf_step, sign_step] {
            let mut openssl = std::process::Command::new("openssl");
            openssl.args(&step);
            let out = run_with_timeout(&mut openssl, Duration::from_secs(30)).expect("openssl runs");
            assert!(out.success(), "openssl {step:?} failed: {out}");
        }
        Pki { ca: path("ca.pem"), cert: path("cert.pem"), key: path("key.pem") }
    }
}
