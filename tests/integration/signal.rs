//! Stopping the agent: SIGTERM and SIGINT make it remove its socket and
//! exit 0.

use rustix::process::Signal;

use crate::support::*;

fn check_clean_stop(signal: Signal, name: &str) {
    let dir = Dir::new();
    let mut agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    // A served call first, so the agent has a connection and a cache to drop.
    check_response(
        &agent.grpc().ok(request("", None, None)),
        shared_key(),
        "default",
        3600,
    );

    agent.signal(signal);
    let status = agent.wait();
    assert_eq!(
        status.code(),
        Some(0),
        "{name} ended the agent with {status}\n--- stderr ---\n{}",
        agent.stderr()
    );
    assert!(
        std::fs::symlink_metadata(dir.socket()).is_err(),
        "the socket file is still there after {name}"
    );
    let stderr = agent.stderr();
    assert!(
        stderr.contains(name),
        "the log does not mention {name}:\n{stderr}"
    );
}

#[test]
fn sigterm_removes_the_socket_and_exits_0() {
    check_clean_stop(Signal::TERM, "SIGTERM");
}

#[test]
fn sigint_removes_the_socket_and_exits_0() {
    check_clean_stop(Signal::INT, "SIGINT");
}
