//! `serve` end to end: tokens through gRPC and through `skykit-agent token`
//! (plain and `--json`), `key_id` agreement with `pubkey`, and
//! `--generate-key-if-missing`.

use crate::support::*;

#[test]
fn grpc_get_token_returns_a_verified_token_with_exact_claims() {
    let dir = Dir::new();
    let key = shared_key();
    let agent = dir.serve(&key.write(&dir, "private.pem"));
    let response = agent.grpc().ok(request("", None, None));
    let claims = check_response(&response, key, "default", 3600);
    assert_eq!(
        claims.exp - claims.iat,
        3600,
        "the default lifetime is one hour"
    );
}

#[test]
fn token_command_prints_the_token_alone() {
    let dir = Dir::new();
    let key = shared_key();
    let agent = dir.serve(&key.write(&dir, "private.pem"));
    let from_grpc = agent.grpc().ok(request("", None, None));

    let stdout = assert_success(&dir.token(&[]));
    let token = stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stdout does not end with a newline: {stdout:?}"));
    assert!(
        !token.contains(char::is_whitespace),
        "stdout holds more than the token: {stdout:?}"
    );
    verify(token, &key.public_pem, ISSUER, 3600);
    eqnice(
        &from_grpc.token,
        token,
        "token from the CLI (the cached one)",
    );
}

#[test]
fn token_json_prints_the_proto3_json_mapping() {
    let dir = Dir::new();
    let key = shared_key();
    let _agent = dir.serve(&key.write(&dir, "private.pem"));
    let stdout = assert_success(&dir.token(&["--json", "--lifetime", "10m"]));

    let json: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let object = json.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "expiresAt",
            "identity",
            "issuedAt",
            "issuer",
            "keyId",
            "refreshAfter",
            "token"
        ],
        "{stdout}"
    );
    // grpcurl prints the fields in proto order.
    let positions: Vec<usize> = [
        "\"token\"",
        "\"issuedAt\"",
        "\"expiresAt\"",
        "\"refreshAfter\"",
        "\"issuer\"",
        "\"identity\"",
        "\"keyId\"",
    ]
    .iter()
    .map(|name| {
        stdout
            .find(name)
            .unwrap_or_else(|| panic!("{name} missing in {stdout}"))
    })
    .collect();
    assert!(
        positions.is_sorted(),
        "fields are not in proto order:\n{stdout}"
    );

    let text = |name: &str| {
        json[name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} is not a string"))
    };
    let claims = verify(text("token"), &key.public_pem, ISSUER, 600);
    assert_eq!(text("issuedAt"), rfc3339(claims.iat));
    assert_eq!(text("expiresAt"), rfc3339(claims.exp));
    let refresh_after: prost_types::Timestamp = text("refreshAfter")
        .parse()
        .unwrap_or_else(|error| panic!("refreshAfter is not RFC 3339: {error}"));
    let refresh_seconds = refresh_after.seconds as u64;
    assert!(
        (claims.iat + 270..=claims.iat + 330).contains(&refresh_seconds),
        "refreshAfter {} is not about halfway through the token's life",
        text("refreshAfter")
    );
    assert!(text("refreshAfter").ends_with('Z'));
    assert_eq!(text("issuer"), ISSUER);
    assert_eq!(text("identity"), "default");
    assert_eq!(text("keyId"), key.key_id);
}

#[test]
fn key_id_in_responses_is_what_pubkey_prints() {
    let dir = Dir::new();
    let key = shared_key();
    let path = key.write(&dir, "private.pem");
    let agent = dir.serve(&path);
    let response = agent.grpc().ok(request("", Some(600), None));
    check_response(&response, key, "default", 600);

    let pubkey = assert_success(&dir.run(&["pubkey", "--key", path.to_str().unwrap()]));
    assert_eq!(printed_key_id(&pubkey), response.key_id);
    eqnice(
        &key.public_pem,
        &printed_public_pem(&pubkey),
        "public key printed by pubkey",
    );
}

#[test]
fn generate_key_if_missing_creates_a_private_key_and_serves() {
    let dir = Dir::new();
    let path = dir.join("keys/private.pem");
    let agent = dir.start(dir.serve_command(&path, &["--generate-key-if-missing"]));

    assert_eq!(mode(&path), 0o600, "the generated key is private");
    assert_eq!(
        mode(&dir.join("keys")),
        0o700,
        "the key folder it creates is private"
    );
    let private_pem = std::fs::read_to_string(&path).unwrap();
    assert!(
        private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
        "{private_pem}"
    );
    let public_pem =
        std::fs::read_to_string(dir.join("keys/public.pem")).expect("public.pem beside the key");
    let key = TestKey {
        key_id: thumbprint(&private_pem),
        public_pem,
        private_pem,
    };
    let stdout = agent.stdout();
    assert!(
        stdout.contains(&key.public_pem),
        "the public key to register is printed:\n{stdout}"
    );
    assert_eq!(printed_key_id(&stdout), key.key_id);

    let response = agent.grpc().ok(request("", None, None));
    check_response(&response, &key, "default", 3600);
}

#[test]
fn missing_key_without_generate_flag_exits_78_naming_the_path() {
    let dir = Dir::new();
    let path = dir.join("keys/private.pem");
    let output = run(dir.serve_command(&path, &[]));
    assert_exit(
        &output,
        EXIT_CONFIG,
        &[
            &format!("signing key {} does not exist", path.display()),
            "skykit-agent keygen",
        ],
    );
    assert!(!path.exists(), "no key was created");
    assert!(!dir.join("keys").exists(), "no key folder was created");
    assert!(!dir.socket().exists(), "nothing was bound");
}
