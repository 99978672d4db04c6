//! The config file as `serve` reads it: every error reported with its line
//! before anything binds, and several identities chosen by name.

use crate::support::*;

#[test]
fn config_errors_name_every_line_and_nothing_binds() {
    let dir = Dir::new();
    shared_key().write(&dir, "private.pem");
    let config = dir.write(
        "config.toml",
        concat!(
            "[[identity]]\n",                 // 1
            "name = \"default\"\n",           // 2
            "issuer = \"you@example.com\"\n", // 3
            "colour = \"blue\"\n",            // 4
            "lifetime = \"2h\"\n",            // 5
        ),
    );
    let mut command = dir.command(&["serve", "--socket"]);
    command.arg(dir.socket()).arg("--config").arg(&config);
    let output = run(command);
    let at = |line: u32| format!("{}:{line}: ", config.display());
    assert_exit(
        &output,
        EXIT_CONFIG,
        &[
            "invalid configuration (",
            &format!("{}unknown key `colour` in [[identity]]", at(4)),
            &format!(
                "{}`lifetime`: lifetime 7200s is over the maximum of 3600s",
                at(5)
            ),
        ],
    );
    assert!(
        !dir.socket().exists(),
        "serve bound its socket despite a bad config"
    );
}

#[test]
fn missing_config_file_named_by_flag_exits_78() {
    let dir = Dir::new();
    let config = dir.join("nowhere.toml");
    let mut command = dir.command(&["serve", "--socket"]);
    command
        .arg(dir.socket())
        .arg("--config")
        .arg(&config)
        .args(["--issuer", ISSUER]);
    assert_exit(
        &run(command),
        EXIT_CONFIG,
        &[&format!(
            "cannot read config file {} (named by --config): it does not exist",
            config.display()
        )],
    );
    assert!(!dir.socket().exists());
}

/// A config with two identities whose keys and issuers differ; `beta`
/// lives at a path relative to the config file and has a 10-minute lifetime.
fn two_identities(dir: &Dir) -> std::process::Command {
    shared_key().write(dir, "alpha.pem");
    dir.fixture("rsa2048-pkcs1.pem");
    let config = dir.write(
        "config.toml",
        format!(
            "[[identity]]\nname = \"alpha\"\nissuer = \"{ISSUER}\"\nkey = \"{}\"\n\n\
             [[identity]]\nname = \"beta\"\nissuer = \"{ISSUER}\"\nkey = \"rsa2048-pkcs1.pem\"\nlifetime = \"10m\"\ndefault = true\n",
            dir.join("alpha.pem").display()
        ),
    );
    let mut command = dir.command(&["serve", "--socket"]);
    command.arg(dir.socket()).arg("--config").arg(config);
    command
}

#[test]
fn token_identity_picks_the_named_identity() {
    let dir = Dir::new();
    let agent = dir.start(two_identities(&dir));
    let (alpha, beta) = (shared_key(), pkcs1_key());

    // No identity: the one marked default, with its own default lifetime.
    let stdout = assert_success(&dir.token(&[]));
    let default_claims = verify(stdout.trim_end(), &beta.public_pem, ISSUER, 600);

    let stdout = assert_success(&dir.token(&["--identity", "alpha"]));
    verify(stdout.trim_end(), &alpha.public_pem, ISSUER, 3600);

    let stdout = assert_success(&dir.token(&["--identity", "beta", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["identity"], "beta");
    assert_eq!(json["keyId"].as_str(), Some(beta.key_id.as_str()));
    let claims = verify(
        json["token"].as_str().unwrap(),
        &beta.public_pem,
        ISSUER,
        600,
    );
    assert_eq!(
        claims, default_claims,
        "the default identity's cached token"
    );

    let mut grpc = agent.grpc();
    check_response(
        &grpc.ok(request("alpha", Some(600), None)),
        alpha,
        "alpha",
        600,
    );
    check_response(&grpc.ok(request("", None, None)), &beta, "beta", 600);
}

#[test]
fn token_unknown_identity_exits_4() {
    let dir = Dir::new();
    let _agent = dir.start(two_identities(&dir));
    let output = dir.token(&["--identity", "gamma"]);
    assert_exit(&output, 4, &["NotFound", "unknown identity \"gamma\""]);
    assert!(output.stdout.is_empty());
}
