//! The systemd units in `systemd/`: `systemd-analyze verify` accepts them
//! pointed at the built binary, the shipped service keeps its documented
//! `ExecStart=` and hardening (exposure 1.0 or lower), the socket keeps its
//! permissions, and the example config and sysusers.d file are sound.
//!
//! These tests need systemd's tools (`systemd-analyze`, `systemd-sysusers`)
//! but not a running systemd, and fail loudly when a tool is missing rather
//! than pass without checking anything.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::support::{
    BIN, Dir, SYSTEM_BINARY, assert_exposure_at_most_1_0, assert_silent_success, describe, run,
    systemd_dir, systemd_tool, systemd_verify,
};

/// The exact `ExecStart=` line the README and the issue document.
const EXEC_START: &str =
    "ExecStart=/usr/bin/skykit-agent serve --config /etc/skykit-agent/config.toml";
/// Where the shipped user units name the binary, replaced in the copies.
const USER_BINARY: &str = "%h/.cargo/bin/skykit-agent";

fn read(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Copies units from `from` into `to` under their own names (so
/// `Requires=skykit-agent.socket` still finds its socket), with every
/// `binary` replaced by the built binary; returns the copies.
fn copy_units(from: &Path, names: &[&str], binary: &str, to: &Path) -> Vec<PathBuf> {
    // `%` starts a specifier in unit files; a literal one is written `%%`.
    let built = BIN.replace('%', "%%");
    assert!(
        !built.contains(char::is_whitespace),
        "the built binary's path {BIN} contains whitespace, which unit files would split"
    );
    names
        .iter()
        .map(|name| {
            let text = read(&from.join(name));
            let copy = to.join(name);
            if name.ends_with(".service") {
                for key in ["ExecStart=", "ExecReload="] {
                    assert!(
                        text.lines()
                            .any(|line| line.starts_with(key) && line.contains(binary)),
                        "{name}: expected an {key} line running {binary}"
                    );
                }
            }
            fs::write(&copy, text.replace(binary, &built)).expect("write a unit copy");
            copy
        })
        .collect()
}

/// `systemd-analyze verify` (system or user manager) must accept `units`
/// without a word.
fn assert_verifies_silently(dir: &Dir, user: bool, units: &[PathBuf]) {
    assert_silent_success(
        &systemd_verify(dir, user, units),
        &format!(
            "systemd-analyze verify{} of {units:?}",
            if user { " --user" } else { "" }
        ),
    );
}

#[test]
fn system_units_verify_without_output() {
    let dir = Dir::new();
    let units = copy_units(
        &systemd_dir(),
        &["skykit-agent.socket", "skykit-agent.service"],
        SYSTEM_BINARY,
        dir.path(),
    );
    assert_verifies_silently(&dir, false, &units);
}

#[test]
fn user_units_verify_without_output() {
    let dir = Dir::new();
    let units = copy_units(
        &systemd_dir().join("user"),
        &["skykit-agent.socket", "skykit-agent.service"],
        USER_BINARY,
        dir.path(),
    );
    assert_verifies_silently(&dir, true, &units);
}

/// The verify tests would be worthless if verify ignored the binary: with
/// `ExecStart=` pointing nowhere it must complain.
#[test]
fn verify_rejects_a_missing_binary() {
    let dir = Dir::new();
    let from = systemd_dir();
    let socket = dir.join("skykit-agent.socket");
    fs::copy(from.join("skykit-agent.socket"), &socket).expect("copy the socket unit");
    let missing = dir.join("no-such-skykit-agent");
    let service = dir.join("skykit-agent.service");
    let text = read(&from.join("skykit-agent.service"))
        .replace(SYSTEM_BINARY, missing.to_str().expect("a UTF-8 temp path"));
    fs::write(&service, text).expect("write a unit copy");
    let output = systemd_verify(&dir, false, &[socket, service]);
    let all = describe(&output);
    assert!(
        !output.status.success() && all.contains("no-such-skykit-agent"),
        "systemd-analyze verify should reject a missing binary:\n{all}"
    );
}

/// The `Key=value` settings of a unit file, in order, without comments.
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with(['#', ';', '[']))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

fn values<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(name, _)| name == key)
        .map(|(_, value)| value.as_str())
        .collect()
}

fn is_true(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "yes" | "true" | "1" | "on" | "y" | "t"
    )
}

#[test]
fn shipped_service_runs_the_documented_command() {
    let text = read(&systemd_dir().join("skykit-agent.service"));
    let exec_starts: Vec<&str> = text
        .lines()
        .filter(|line| line.trim_start().starts_with("ExecStart"))
        .collect();
    assert_eq!(exec_starts, [EXEC_START], "the shipped ExecStart= line");

    let settings = unit_settings(&text);
    assert_eq!(values(&settings, "Type"), ["notify"]);
    assert_eq!(
        values(&settings, "ExecReload"),
        [
            "/usr/bin/skykit-agent check --config /etc/skykit-agent/config.toml",
            "/bin/kill -HUP $MAINPID",
        ],
        "reload must check the config before it signals the agent"
    );
    assert_eq!(values(&settings, "Restart"), ["on-failure"]);
    assert_eq!(values(&settings, "RestartPreventExitStatus"), ["78"]);
    assert_eq!(values(&settings, "Requires"), ["skykit-agent.socket"]);
    assert_eq!(values(&settings, "After"), ["skykit-agent.socket"]);
    assert_eq!(values(&settings, "User"), ["skykit-agent"]);
    assert_eq!(
        values(&settings, "LoadCredential"),
        ["private.pem:/etc/skykit-agent/private.pem"]
    );
    assert!(
        !values(&settings, "WatchdogSec").is_empty(),
        "WatchdogSec= is set"
    );
    // systemd removes a runtime directory when the service stops, which
    // would delete the socket the .socket unit owns.
    assert!(
        values(&settings, "RuntimeDirectory").is_empty(),
        "the service must not have a RuntimeDirectory="
    );
    // These would hide who the callers are (peer uid 65534, pid 0, no /proc).
    assert!(
        !values(&settings, "PrivateUsers").into_iter().any(is_true),
        "the service must not use PrivateUsers=yes"
    );
    assert!(
        !values(&settings, "ProtectProc").contains(&"invisible"),
        "the service must not use ProtectProc=invisible"
    );
    assert_eq!(values(&settings, "RestrictAddressFamilies"), ["AF_UNIX"]);
}

#[test]
fn shipped_service_exposure_is_at_most_1_0() {
    // The unit alone, in a folder of its own: beside the shipped file,
    // systemd-analyze would also apply the optional drop-ins in
    // systemd/skykit-agent.service.d/ (network.conf has its own record).
    let dir = Dir::new();
    let service = dir.join("skykit-agent.service");
    fs::copy(systemd_dir().join("skykit-agent.service"), &service).expect("copy the service");
    assert_exposure_at_most_1_0(&dir, &service, "of the shipped service");
}

#[test]
fn shipped_socket_grants_the_skykit_group() {
    let settings = unit_settings(&read(&systemd_dir().join("skykit-agent.socket")));
    assert_eq!(
        values(&settings, "ListenStream"),
        ["/run/skykit-agent/agent.sock"]
    );
    assert_eq!(values(&settings, "SocketMode"), ["0660"]);
    assert_eq!(values(&settings, "SocketGroup"), ["skykit"]);
    assert_eq!(values(&settings, "DirectoryMode"), ["0755"]);
    assert_eq!(values(&settings, "RemoveOnStop"), ["no"]);
    assert_eq!(values(&settings, "WantedBy"), ["sockets.target"]);

    let user = unit_settings(&read(&systemd_dir().join("user/skykit-agent.socket")));
    assert_eq!(
        values(&user, "ListenStream"),
        ["%t/skykit-agent/agent.sock"]
    );
    assert_eq!(values(&user, "SocketMode"), ["0600"]);
}

/// The keys `config.rs` accepts. The policy tests also run the agent with
/// this example config, which is the stronger check.
const TOP_LEVEL_KEYS: &[&str] = &[
    "socket",
    "socket_mode",
    "socket_group",
    "require_locked_memory",
    "identity",
];
const IDENTITY_KEYS: &[&str] = &[
    "name",
    "issuer",
    "key",
    "key_credential",
    "lifetime",
    "default",
    "allow_insecure_key_permissions",
    "allow_uids",
    "allow_gids",
    "allow_users",
    "allow_groups",
];

#[test]
fn example_config_is_valid_toml_for_the_units() {
    let path = systemd_dir().join("config.toml");
    let config: toml::Table = toml::from_str(&read(&path))
        .unwrap_or_else(|error| panic!("{} is not valid TOML: {error}", path.display()));
    for key in config.keys() {
        assert!(
            TOP_LEVEL_KEYS.contains(&key.as_str()),
            "unknown key `{key}`"
        );
    }
    let text = |table: &toml::Table, key: &str| {
        table
            .get(key)
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no string `{key}` in {}", path.display()))
    };
    assert_eq!(text(&config, "socket_group"), "skykit");
    assert_eq!(text(&config, "socket"), "/run/skykit-agent/agent.sock");
    let identities = config
        .get("identity")
        .and_then(toml::Value::as_array)
        .expect("[[identity]] sections");
    assert_eq!(identities.len(), 1);
    let identity = identities[0].as_table().expect("an [[identity]] table");
    for key in identity.keys() {
        assert!(
            IDENTITY_KEYS.contains(&key.as_str()),
            "unknown identity key `{key}`"
        );
    }
    assert_eq!(text(identity, "name"), "default");
    // LoadCredential=private.pem:... in the service delivers it.
    assert_eq!(text(identity, "key_credential"), "private.pem");
    // The socket group and the identity's policy agree.
    assert_eq!(
        identity
            .get("allow_groups")
            .and_then(toml::Value::as_array)
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(identity["allow_groups"][0].as_str(), Some("skykit"));
    assert!(
        identity.get("key").is_none(),
        "a credential, not a key path"
    );
}

#[test]
fn sysusers_creates_the_service_user_and_client_group() {
    let dir = Dir::new();
    let root = dir.join("root");
    fs::create_dir_all(root.join("etc")).expect("create root/etc");
    let conf = systemd_dir().join("sysusers.d/skykit-agent.conf");
    let root_arg = format!("--root={}", root.display());
    let mut sysusers = systemd_tool("systemd-sysusers", dir.path());
    sysusers.arg(&root_arg).arg(&conf);
    let output = run(sysusers);
    assert!(
        output.status.success(),
        "systemd-sysusers:\n{}",
        describe(&output)
    );
    let passwd = read(&root.join("etc/passwd"));
    let group = read(&root.join("etc/group"));
    let user = passwd
        .lines()
        .find(|line| line.starts_with("skykit-agent:"))
        .unwrap_or_else(|| panic!("no skykit-agent user in\n{passwd}"));
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(fields[5], "/nonexistent", "home of {user}");
    assert!(
        fields[6].ends_with("nologin"),
        "{user}: a system user without a login shell"
    );
    for name in ["skykit", "skykit-agent"] {
        assert!(
            group
                .lines()
                .any(|line| line.starts_with(&format!("{name}:"))),
            "no group {name} in\n{group}"
        );
    }
}
