//! The socket file: its mode, the directory made for it, and what `serve`
//! does when something is already at the path.

use std::{
    fs,
    os::unix::{fs::FileTypeExt, net::UnixListener},
};

use crate::support::*;

#[test]
fn socket_has_mode_0600() {
    let dir = Dir::new();
    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    let metadata = fs::symlink_metadata(agent.socket()).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(mode(agent.socket()), 0o600);
}

#[test]
fn socket_directory_the_agent_creates_is_0700() {
    let dir = Dir::new();
    let socket = dir.join("run/skykit-agent/agent.sock");
    let mut command = dir.command(&["serve", "--socket"]);
    command
        .arg(&socket)
        .arg("--key")
        .arg(shared_key().write(&dir, "private.pem"))
        .args(["--issuer", ISSUER]);
    let agent = dir.start_at(command, &socket);
    assert_eq!(mode(&dir.join("run/skykit-agent")), 0o700);
    assert_eq!(mode(&dir.join("run")), 0o700);
    assert_eq!(mode(&socket), 0o600);
    check_response(
        &agent.grpc().ok(request("", None, None)),
        shared_key(),
        "default",
        3600,
    );
}

#[test]
fn second_serve_on_a_live_socket_refuses_and_the_first_keeps_serving() {
    let dir = Dir::new();
    let key = shared_key().write(&dir, "private.pem");
    let first = dir.serve(&key);
    let before = first.grpc().ok(request("", None, None));

    let output = run(dir.serve_command(&key, &[]));
    assert_exit(
        &output,
        1,
        &[&format!(
            "another skykit-agent is already listening on {}",
            dir.socket().display()
        )],
    );

    assert!(
        dir.socket().exists(),
        "the second agent removed the first one's socket"
    );
    let after = first.grpc().ok(request("", None, None));
    eqnice(&before.token, &after.token, "token from the first agent");
}

#[test]
fn stale_socket_is_replaced() {
    let dir = Dir::new();
    drop(UnixListener::bind(dir.socket()).unwrap());
    assert!(
        fs::symlink_metadata(dir.socket())
            .unwrap()
            .file_type()
            .is_socket()
    );

    let agent = dir.serve(&shared_key().write(&dir, "private.pem"));
    check_response(
        &agent.grpc().ok(request("", None, None)),
        shared_key(),
        "default",
        3600,
    );
    assert_eq!(mode(&dir.socket()), 0o600);
    let stderr = agent.stderr();
    assert!(stderr.contains("replacing a stale socket"), "{stderr}");
}

#[test]
fn regular_file_at_the_socket_path_is_refused_and_kept() {
    let dir = Dir::new();
    let socket = dir.write_mode("agent.sock", "precious\n", 0o644);
    let output = run(dir.serve_command(&shared_key().write(&dir, "private.pem"), &[]));
    assert_exit(
        &output,
        1,
        &[&format!(
            "{} exists and is a regular file, not a socket; the agent never removes it",
            socket.display()
        )],
    );
    assert_eq!(fs::read_to_string(&socket).unwrap(), "precious\n");
}

#[test]
fn symlink_at_the_socket_path_is_refused_and_kept() {
    let dir = Dir::new();
    let key = shared_key().write(&dir, "private.pem");
    for target in [dir.join("elsewhere.sock"), key.clone()] {
        let _ = fs::remove_file(dir.socket());
        std::os::unix::fs::symlink(&target, dir.socket()).unwrap();
        let output = run(dir.serve_command(&key, &[]));
        assert_exit(
            &output,
            1,
            &[&format!(
                "{} exists and is a symbolic link, not a socket",
                dir.socket().display()
            )],
        );
        let metadata = fs::symlink_metadata(dir.socket()).expect("the symlink is still there");
        assert!(metadata.file_type().is_symlink());
        assert_eq!(fs::read_link(dir.socket()).unwrap(), target);
        assert!(
            !dir.join("elsewhere.sock").exists(),
            "nothing was bound through the link"
        );
    }
}
