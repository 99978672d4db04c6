//! `GetToken` requests: the limits on `lifetime` and `min_valid_for`,
//! unknown identities, the cache, and the exit codes and socket discovery
//! of `skykit-agent token`.

use skykit_agent::proto::GetTokenRequest;
use tonic::Code;

use crate::support::*;

/// Asserts that the agent refuses `request` with `code` and a message
/// containing every `needle`.
fn check_refused(grpc: &mut Grpc, request: GetTokenRequest, code: Code, needles: &[&str]) {
    let described = format!("{request:?}");
    let status = match grpc.get_token(request) {
        Ok(response) => panic!("{described} was accepted: {response:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{described}: {status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{described}: message {:?} lacks {needle:?}",
            status.message()
        );
    }
}

#[test]
fn lifetime_over_an_hour_is_invalid_argument_naming_limit_and_value() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let mut grpc = agent.grpc();
    check_refused(
        &mut grpc,
        request("", Some(3601), None),
        Code::InvalidArgument,
        &["3601s", "3600s"],
    );
    check_refused(
        &mut grpc,
        request("", Some(86_400), None),
        Code::InvalidArgument,
        &["86400s", "3600s"],
    );
    // The limit itself is fine.
    let response = grpc.ok(request("", Some(3600), None));
    check_response(&response, shared_key(), "default", 3600);
}

#[test]
fn lifetime_under_a_minute_is_invalid_argument_naming_limit_and_value() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let mut grpc = agent.grpc();
    check_refused(
        &mut grpc,
        request("", Some(59), None),
        Code::InvalidArgument,
        &["59s", "60s"],
    );
    check_refused(
        &mut grpc,
        request("", Some(0), None),
        Code::InvalidArgument,
        &["0s", "60s"],
    );
    check_refused(
        &mut grpc,
        request("", Some(-60), None),
        Code::InvalidArgument,
        &["-60s", "60s"],
    );
    let response = grpc.ok(request("", Some(60), None));
    check_response(&response, shared_key(), "default", 60);
}

#[test]
fn durations_with_nanos_are_invalid_argument() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let mut grpc = agent.grpc();
    let half_second = |seconds| prost_types::Duration {
        seconds,
        nanos: 500_000_000,
    };
    let lifetime = GetTokenRequest {
        lifetime: Some(half_second(600)),
        ..request("", None, None)
    };
    check_refused(
        &mut grpc,
        lifetime,
        Code::InvalidArgument,
        &["lifetime", "500000000"],
    );
    let min_valid_for = GetTokenRequest {
        min_valid_for: Some(half_second(60)),
        ..request("", Some(600), None)
    };
    check_refused(
        &mut grpc,
        min_valid_for,
        Code::InvalidArgument,
        &["min_valid_for", "500000000"],
    );
}

#[test]
fn min_valid_for_longer_than_the_lifetime_is_invalid_argument() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let mut grpc = agent.grpc();
    check_refused(
        &mut grpc,
        request("", Some(600), Some(601)),
        Code::InvalidArgument,
        &["min_valid_for 601s", "600s"],
    );
    // Without a lifetime, the identity's default (1h) is the limit.
    check_refused(
        &mut grpc,
        request("", None, Some(3601)),
        Code::InvalidArgument,
        &["min_valid_for 3601s", "3600s"],
    );
    let response = grpc.ok(request("", Some(600), Some(600)));
    check_response(&response, shared_key(), "default", 600);
}

#[test]
fn unknown_identity_is_not_found() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    check_refused(
        &mut agent.grpc(),
        request("nobody-here", None, None),
        Code::NotFound,
        &["unknown identity", "nobody-here"],
    );
}

#[test]
fn lifetime_of_600s_gives_exp_600s_after_iat() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let response = agent.grpc().ok(request("", Some(600), None));
    let claims = check_response(&response, shared_key(), "default", 600);
    assert_eq!(claims.exp - claims.iat, 600);
    let (issued_at, expires_at) = (response.issued_at.unwrap(), response.expires_at.unwrap());
    assert_eq!(expires_at.seconds - issued_at.seconds, 600);
    assert_eq!((issued_at.nanos, expires_at.nanos), (0, 0));
}

#[test]
fn serve_lifetime_flag_sets_the_default_lifetime() {
    let dir = Dir::new();
    let key = shared_key();
    let agent =
        dir.start(dir.serve_command(&key.write(&dir, "private.pem"), &["--lifetime", "15m"]));
    let response = agent.grpc().ok(request("", None, None));
    check_response(&response, key, "default", 900);
}

#[test]
fn two_calls_return_the_same_cached_token() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let mut grpc = agent.grpc();
    let first = grpc.ok(request("", Some(600), None));
    let second = grpc.ok(request("", Some(600), None));
    let claims = check_response(&first, shared_key(), "default", 600);
    eqnice(&first.token, &second.token, "second token");
    // RS256 signatures are deterministic, so equal tokens within one second
    // prove little; the random refresh_after and a call in a later second do.
    assert_eq!(first, second, "the whole response is the cached one");
    wait_for_second_after(claims.iat);
    let later = grpc.ok(request("", Some(600), None));
    assert_eq!(
        first, later,
        "a call in a later second still gets the cached token"
    );
    // A new connection sees the same cache.
    let third = agent.grpc().ok(request("", Some(600), Some(60)));
    eqnice(&first.token, &third.token, "token on a new connection");
    // Another lifetime is another cache entry.
    let other = grpc.ok(request("", Some(900), None));
    check_response(&other, shared_key(), "default", 900);
    assert_ne!(other.token, first.token);
}

#[test]
fn min_valid_for_the_cached_token_cannot_meet_signs_a_newer_token_that_replaces_it() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let mut grpc = agent.grpc();
    let first = grpc.ok(request("", Some(600), None));
    let first_claims = check_response(&first, shared_key(), "default", 600);
    eqnice(
        &first.token,
        &grpc.ok(request("", Some(600), None)).token,
        "cached token",
    );

    wait_for_second_after(first_claims.iat);
    // Once a second has passed the cached token has less than 600 s left.
    let newer = grpc.ok(request("", Some(600), Some(600)));
    let newer_claims = check_response(&newer, shared_key(), "default", 600);
    assert!(
        newer_claims.iat > first_claims.iat,
        "issued_at {} is not later than the cached token's {}",
        newer_claims.iat,
        first_claims.iat
    );
    let after = grpc.ok(request("", Some(600), None));
    eqnice(&newer.token, &after.token, "token after the replacement");
}

#[test]
fn token_command_exits_4_when_the_agent_refuses() {
    let dir = Dir::new();
    let _agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let output = dir.token(&["--lifetime", "2h"]);
    assert_exit(&output, 4, &["InvalidArgument", "7200s", "3600s"]);
    assert!(output.stdout.is_empty(), "no token on stdout");
    assert_exit(
        &dir.token(&["--lifetime", "59s"]),
        4,
        &["InvalidArgument", "59s", "60s"],
    );
    assert_exit(
        &dir.token(&["--lifetime", "10m", "--min-valid-for", "11m"]),
        4,
        &["InvalidArgument", "660s", "600s"],
    );
    assert_exit(
        &dir.token(&["--identity", "ghost"]),
        4,
        &["NotFound", "ghost"],
    );
}

#[test]
fn token_command_exits_3_listing_the_socket_it_tried() {
    let dir = Dir::new();
    let missing = dir.join("nothing-here.sock");
    let mut command = dir.command(&["token", "--socket"]);
    command.arg(&missing);
    let output = run(command);
    assert_exit(
        &output,
        3,
        &[
            "cannot reach skykit-agent",
            &format!("{} (--socket): does not exist", missing.display()),
        ],
    );
    assert!(output.stdout.is_empty());

    // Named by the environment instead; a socket file nobody listens on.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let mut command = dir.command(&["token"]);
    command.env("SKYKIT_AGENT_SOCKET", &stale);
    assert_exit(
        &run(command),
        3,
        &[&format!(
            "{} ($SKYKIT_AGENT_SOCKET): nothing is listening",
            stale.display()
        )],
    );
}

#[test]
fn token_command_finds_the_agent_through_the_environment() {
    let dir = Dir::new();
    let key = shared_key();
    let socket = dir.join("xdg/skykit-agent/agent.sock");
    let mut serve = dir.command(&["serve", "--socket"]);
    serve
        .arg(&socket)
        .arg("--key")
        .arg(key.write(&dir, "private.pem"))
        .args(["--issuer", ISSUER]);
    let _agent = dir.start_at(serve, &socket);

    let mut by_socket_env = dir.command(&["token"]);
    by_socket_env.env("SKYKIT_AGENT_SOCKET", &socket);
    let token = assert_success(&run(by_socket_env));
    verify(token.trim_end(), &key.public_pem, ISSUER, 3600);

    let mut by_xdg = dir.command(&["token"]);
    by_xdg.env("XDG_RUNTIME_DIR", dir.join("xdg"));
    eqnice(
        &token,
        &assert_success(&run(by_xdg)),
        "token found through $XDG_RUNTIME_DIR",
    );
}
