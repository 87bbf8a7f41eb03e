//! Throwaway TLS files for tests that need a server of their own to speak TLS (a test etcd,
//! an HTTPS upstream behind the proxy).

use std::path::{Path, PathBuf};
use std::process::Command;

/// TLS files for a test server (an etcd, an HTTPS upstream), made with the `openssl` command
/// (Debian `openssl`): a throwaway CA, and one certificate for 127.0.0.1 and localhost, good
/// for server and client use. Its CN, "localhost", names no etcd user, so the certificate
/// alone grants nothing under etcd's auth.
#[derive(Debug, Clone)]
pub struct TestTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestTls {
    /// Generates the CA, key and certificate in `dir/tls`. Panics when openssl fails.
    pub fn generate(dir: &Path) -> Self {
        let d = dir.join("tls");
        std::fs::create_dir_all(&d).unwrap();
        let ext = d.join("ext.cnf");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n\
             basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n",
        )
        .unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&d)
                .output()
                .expect("openssl not found: install Debian openssl (scripts/deps does)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ca =
            ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tokend-test-ca"];
        openssl(&[&["req", "-x509"][..], &ec, &ca].concat());
        let node = ["-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=localhost"];
        openssl(&[&["req"][..], &ec, &node].concat());
        openssl(&[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "node.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        Self { ca: d.join("ca.pem"), cert: d.join("node.pem"), key: d.join("node.key") }
    }
}
