//! Loading the signing key: both PEM formats and the accepted variants
//! serve verifiable tokens; every refused case makes `serve` exit 78 with a
//! message that names the file and what it found.

use std::{fs, os::unix::fs::MetadataExt, path::Path};

use crate::support::*;

/// Starts an agent on `key` and checks a token it signs with `expected`.
fn check_serves(dir: &Dir, key_path: &Path, expected: &TestKey) {
    let agent = dir.serve(key_path);
    let response = agent.grpc().ok(request("", Some(600), None));
    check_response(&response, expected, "default", 600);
}

/// Asserts that `serve` refuses the key at `key_path` with exit code 78,
/// naming the file and saying `what` is wrong, before binding anything.
fn check_refused(dir: &Dir, key_path: &Path, what: &str) {
    let output = run(dir.serve_command(key_path, &[]));
    let named = format!("signing key {}", key_path.display());
    assert_exit(&output, EXIT_CONFIG, &[&named, what]);
    assert!(
        !dir.socket().exists(),
        "serve bound its socket despite the bad key"
    );
}

/// Refuses the committed fixture NAME (copied with mode 0600).
fn check_fixture_refused(name: &str, what: &str) {
    let dir = Dir::new();
    let path = dir.fixture(name);
    check_refused(&dir, &path, what);
}

/// The base64 body of a single-block PEM, without line breaks.
fn base64_body(pem: &str) -> String {
    pem.lines()
        .filter(|line| !line.starts_with("-----"))
        .collect()
}

/// `pem` with its base64 re-wrapped at `width` columns.
fn rewrap(pem: &str, width: usize) -> String {
    let lines: Vec<&str> = pem.lines().collect();
    let (begin, end) = (lines[0], lines[lines.len() - 1]);
    let body = base64_body(pem);
    let mut out = format!("{begin}\n");
    for chunk in body.as_bytes().chunks(width) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(end);
    out.push('\n');
    out
}

#[test]
fn pkcs8_key_loads_and_serves() {
    let dir = Dir::new();
    let key = shared_key();
    assert!(key.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    check_serves(&dir, &key.write(&dir, "private.pem"), key);
}

#[test]
fn pkcs1_key_loads_and_serves() {
    let dir = Dir::new();
    let key = pkcs1_key();
    assert!(
        key.private_pem
            .starts_with("-----BEGIN RSA PRIVATE KEY-----\n")
    );
    check_serves(&dir, &dir.fixture("rsa2048-pkcs1.pem"), &key);
}

#[test]
fn crlf_line_ends_are_accepted() {
    let dir = Dir::new();
    for key in [shared_key().clone(), pkcs1_key()] {
        let crlf = key.private_pem.replace('\n', "\r\n");
        let path = dir.write("crlf.pem", crlf);
        check_serves(&dir, &path, &key);
    }
}

#[test]
fn text_around_the_pem_block_is_accepted() {
    let dir = Dir::new();
    let key = shared_key();
    let wrapped = format!(
        "Bag Attributes\n    friendlyName: skykit\nsubject=CN = you@example.com\n\n{}\nsaved by a tool: do not edit\n",
        key.private_pem
    );
    check_serves(&dir, &dir.write("surrounded.pem", wrapped), key);
}

#[test]
fn base64_wrapped_at_76_columns_is_accepted() {
    let dir = Dir::new();
    for key in [shared_key().clone(), pkcs1_key()] {
        let rewrapped = rewrap(&key.private_pem, 76);
        assert!(rewrapped.lines().nth(1).unwrap().len() == 76, "{rewrapped}");
        check_serves(&dir, &dir.write("76.pem", rewrapped), &key);
    }
}

#[test]
fn missing_key_is_refused() {
    let dir = Dir::new();
    check_refused(&dir, &dir.join("absent.pem"), "does not exist");
}

#[test]
fn unreadable_key_is_refused() {
    let dir = Dir::new();
    let key = shared_key().write(&dir, "private.pem");
    if !is_root() {
        chmod(&key, 0o000);
        check_refused(&dir, &key, "cannot read signing key");
        return;
    }
    // Root reads any file, so run the agent as nobody on a root-owned 0600
    // key, in a directory (and from a binary) nobody can reach.
    chmod(dir.path(), 0o755);
    let binary = dir.join("skykit-agent");
    if fs::hard_link(BIN, &binary).is_err() {
        fs::copy(BIN, &binary).expect("copy the binary where nobody can run it");
    }
    let mut command = std::process::Command::new("setpriv");
    scrub(&mut command, dir.path());
    command
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".to_owned(),
        ])
        .arg(&binary)
        .args(["serve", "--socket"])
        .arg(dir.socket())
        .arg("--key")
        .arg(&key)
        .args(["--issuer", ISSUER]);
    let output = run(command);
    assert_exit(
        &output,
        EXIT_CONFIG,
        &[
            &format!("cannot read signing key {}", key.display()),
            &format!("permission denied for uid {NOBODY}"),
        ],
    );
    assert!(!dir.socket().exists());
}

#[test]
fn text_that_is_not_pem_is_refused() {
    let dir = Dir::new();
    let path = dir.write("notes.txt", "my key is in the password manager\n");
    check_refused(&dir, &path, "is not PEM");
}

#[test]
fn public_key_is_refused() {
    check_fixture_refused(
        "rsa2048-public.pem",
        "holds a public key (`BEGIN PUBLIC KEY`), not a private key",
    );
}

#[test]
fn certificate_is_refused() {
    check_fixture_refused(
        "certificate.pem",
        "holds a certificate (`BEGIN CERTIFICATE`), not a private key",
    );
}

#[test]
fn encrypted_pkcs8_key_is_refused() {
    check_fixture_refused("encrypted-pkcs8.pem", "is encrypted with a passphrase");
}

#[test]
fn proc_type_encrypted_pkcs1_key_is_refused() {
    check_fixture_refused("encrypted-pkcs1.pem", "is encrypted with a passphrase");
}

#[test]
fn openssh_key_is_refused() {
    check_fixture_refused(
        "openssh-rsa.key",
        "is an OpenSSH-format key (`BEGIN OPENSSH PRIVATE KEY`)",
    );
}

#[test]
fn ec_sec1_key_is_refused() {
    check_fixture_refused(
        "ec-sec1.pem",
        "is an EC (elliptic curve) private key, but Skykit API needs an RSA key",
    );
}

#[test]
fn ec_pkcs8_key_is_refused() {
    check_fixture_refused(
        "ec-pkcs8.pem",
        "is an EC (elliptic curve) private key, but Skykit API needs an RSA key",
    );
}

#[test]
fn ed25519_key_is_refused() {
    check_fixture_refused(
        "ed25519-pkcs8.pem",
        "is an Ed25519 private key, but Skykit API needs an RSA key",
    );
}

#[test]
fn dsa_key_is_refused() {
    check_fixture_refused(
        "dsa-pkcs8.pem",
        "is a DSA private key, but Skykit API needs an RSA key",
    );
}

#[test]
fn rsa_1024_key_is_refused() {
    check_fixture_refused(
        "rsa1024.pem",
        "is a 1024-bit RSA key; the agent accepts 2048 to 8192 bits",
    );
}

#[test]
fn rsa_key_over_8192_bits_is_refused() {
    check_fixture_refused(
        "rsa8200.pem",
        "is a 8200-bit RSA key; the agent accepts 2048 to 8192 bits",
    );
}

#[test]
fn two_private_keys_in_one_file_are_refused() {
    let dir = Dir::new();
    let both = format!("{}{}", shared_key().private_pem, pkcs1_key().private_pem);
    check_refused(&dir, &dir.write("both.pem", both), "holds 2 private keys");
    let twice = shared_key().private_pem.repeat(2);
    check_refused(&dir, &dir.write("twice.pem", twice), "holds 2 private keys");
}

#[test]
fn key_readable_by_others_is_refused() {
    let dir = Dir::new();
    let path = dir.write_mode("private.pem", &shared_key().private_pem, 0o644);
    assert_eq!(
        fs::metadata(&path).unwrap().uid(),
        rustix::process::geteuid().as_raw(),
        "the key belongs to the test's own uid"
    );
    check_refused(&dir, &path, "has mode 0644, so other users may read it");
    chmod(&path, 0o640);
    check_refused(&dir, &path, "has mode 0640, so other users may read it");
}

#[test]
fn allow_insecure_key_permissions_in_the_config_accepts_a_0644_key() {
    let dir = Dir::new();
    let key = shared_key();
    let path = dir.write_mode("private.pem", &key.private_pem, 0o644);
    let config = dir.write(
        "config.toml",
        format!(
            "[[identity]]\nname = \"default\"\nissuer = \"{ISSUER}\"\nkey = \"{}\"\nallow_insecure_key_permissions = true\n",
            path.display()
        ),
    );
    let mut command = dir.command(&["serve", "--socket"]);
    command.arg(dir.socket()).arg("--config").arg(&config);
    let agent = dir.start(command);
    let response = agent.grpc().ok(request("", Some(600), None));
    check_response(&response, key, "default", 600);
}

#[test]
fn key_of_another_uid_that_the_agent_can_read_is_accepted() {
    require_root("chown the key to another uid");
    let dir = Dir::new();
    let key = shared_key();
    let path = dir.write_mode("private.pem", &key.private_pem, 0o644);
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown the key to nobody");
    assert_eq!(fs::metadata(&path).unwrap().uid(), NOBODY);
    check_serves(&dir, &path, key);
}

#[test]
fn empty_key_file_is_refused() {
    let dir = Dir::new();
    check_refused(&dir, &dir.write("empty.pem", ""), "is empty");
    check_refused(&dir, &dir.write("blank.pem", "\n  \n"), "is empty");
}

#[test]
fn truncated_pem_is_refused() {
    let dir = Dir::new();
    let pem = &shared_key().private_pem;
    let truncated = &pem[..pem.len() / 2];
    check_refused(
        &dir,
        &dir.write("truncated.pem", truncated),
        "the file looks truncated",
    );
    // Lines lost from the middle, the END line still there.
    let lines: Vec<&str> = pem.lines().collect();
    let mut shortened: Vec<&str> = lines[..4].to_vec();
    shortened.extend(&lines[lines.len() - 4..]);
    let shortened = shortened.join("\n") + "\n";
    check_refused(&dir, &dir.write("shortened.pem", shortened), "is damaged");
}
