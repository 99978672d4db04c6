//! `keygen` and `pubkey`: the files keygen writes, that pubkey agrees with
//! them, that keygen never overwrites, and `--bits`.

use std::fs;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, EncodingKey,
    jwk::{AlgorithmParameters, Jwk},
};

use crate::support::*;

/// The modulus size of an RSA private key PEM, read with jsonwebtoken.
fn modulus_bits(private_pem: &str) -> usize {
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("an RSA private key");
    let jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).expect("a JWK of the key");
    let AlgorithmParameters::RSA(rsa) = jwk.algorithm else {
        panic!("not an RSA JWK: {jwk:?}");
    };
    let modulus = URL_SAFE_NO_PAD.decode(rsa.n).expect("n is base64url");
    let first = modulus
        .iter()
        .position(|&byte| byte != 0)
        .expect("a non-zero modulus");
    (modulus.len() - first) * 8 - modulus[first].leading_zeros() as usize
}

/// Runs `keygen --out DIR/NAME` plus `extra`; returns stdout and the key.
fn keygen(dir: &Dir, name: &str, extra: &[&str]) -> (String, TestKey) {
    let out = dir.join(name);
    let mut args = vec!["keygen", "--out", out.to_str().unwrap()];
    args.extend(extra);
    let stdout = assert_success(&dir.run(&args));
    let private_pem =
        fs::read_to_string(out.join("private.pem")).expect("keygen wrote private.pem");
    let public_pem = fs::read_to_string(out.join("public.pem")).expect("keygen wrote public.pem");
    let key = TestKey {
        key_id: thumbprint(&private_pem),
        public_pem,
        private_pem,
    };
    (stdout, key)
}

#[test]
fn keygen_writes_a_private_pkcs8_key_and_its_public_key_and_prints_key_id() {
    let dir = Dir::new();
    let (stdout, key) = keygen(&dir, "keys", &[]);
    let private = dir.join("keys/private.pem");
    assert_eq!(
        mode(&private),
        0o600,
        "private.pem is readable only by its owner"
    );
    assert_eq!(
        mode(&dir.join("keys")),
        0o700,
        "the folder keygen creates is private"
    );
    assert!(
        key.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
        "PKCS#8"
    );
    assert!(key.private_pem.ends_with("-----END PRIVATE KEY-----\n"));
    assert!(
        key.public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"),
        "SPKI"
    );
    assert_eq!(modulus_bits(&key.private_pem), 2048, "2048 bits by default");

    assert_eq!(
        printed_key_id(&stdout),
        key.key_id,
        "the printed key_id is the RFC 7638 thumbprint"
    );
    eqnice(
        &key.public_pem,
        &printed_public_pem(&stdout),
        "public key printed by keygen",
    );
    assert!(
        stdout.contains("Skykit Support"),
        "keygen says how to register the key:\n{stdout}"
    );

    // The key serves tokens that verify with public.pem.
    let agent = dir.serve(&private);
    check_response(
        &agent.grpc().ok(request("", Some(600), None)),
        &key,
        "default",
        600,
    );
}

#[test]
fn pubkey_prints_the_same_public_key_and_key_id_as_keygen() {
    let dir = Dir::new();
    let (keygen_stdout, key) = keygen(&dir, "keys", &[]);
    let private = dir.join("keys/private.pem");
    let stdout = assert_success(&dir.run(&["pubkey", "--key", private.to_str().unwrap()]));
    assert_eq!(printed_key_id(&stdout), printed_key_id(&keygen_stdout));
    assert_eq!(printed_key_id(&stdout), key.key_id);
    eqnice(
        &key.public_pem,
        &printed_public_pem(&stdout),
        "public key printed by pubkey",
    );

    // The same for a key openssl made.
    let pkcs1 = pkcs1_key();
    let path = dir.fixture("rsa2048-pkcs1.pem");
    let stdout = assert_success(&dir.run(&["pubkey", "--key", path.to_str().unwrap()]));
    assert_eq!(printed_key_id(&stdout), pkcs1.key_id);
    eqnice(
        &pkcs1.public_pem,
        &printed_public_pem(&stdout),
        "public key of the openssl key",
    );
}

#[test]
fn keygen_refuses_to_overwrite() {
    let dir = Dir::new();
    let (_, key) = keygen(&dir, "keys", &[]);
    let out = dir.join("keys");
    let output = dir.run(&["keygen", "--out", out.to_str().unwrap()]);
    let private = out.join("private.pem");
    assert_exit(
        &output,
        1,
        &[&format!(
            "{} already exists; keygen never overwrites a key",
            private.display()
        )],
    );
    assert_eq!(
        fs::read_to_string(&private).unwrap(),
        key.private_pem,
        "private.pem is unchanged"
    );
    assert_eq!(
        fs::read_to_string(out.join("public.pem")).unwrap(),
        key.public_pem
    );

    // A public.pem alone is protected too, and no private.pem appears.
    let other = dir.join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("public.pem"), "registered key\n").unwrap();
    let output = dir.run(&["keygen", "--out", other.to_str().unwrap()]);
    assert_exit(
        &output,
        1,
        &[&format!(
            "{} already exists",
            other.join("public.pem").display()
        )],
    );
    assert_eq!(
        fs::read_to_string(other.join("public.pem")).unwrap(),
        "registered key\n"
    );
    assert!(!other.join("private.pem").exists());
}

#[test]
fn keygen_bits_3072_makes_a_3072_bit_key() {
    let dir = Dir::new();
    let (stdout, key) = keygen(&dir, "keys", &["--bits", "3072"]);
    assert_eq!(modulus_bits(&key.private_pem), 3072);
    assert_eq!(printed_key_id(&stdout), key.key_id);
}
