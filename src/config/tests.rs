//! Config resolution tests; the environment is a map, never `set_var`.

use super::*;
use crate::policy::Policy;

struct Setup {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
    overrides: Overrides,
    euid: u32,
}

impl Setup {
    fn new() -> Self {
        Setup {
            dir: tempfile::tempdir().unwrap(),
            env: HashMap::from([("XDG_RUNTIME_DIR".to_owned(), "/xdg".to_owned())]),
            overrides: Overrides::default(),
            euid: 1000,
        }
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    /// Writes `config.toml` in the default config dir.
    fn file(&self, text: &str) -> PathBuf {
        fs::create_dir_all(self.config_dir()).unwrap();
        let path = self.config_dir().join(CONFIG_FILE);
        fs::write(&path, text).unwrap();
        path
    }

    fn load(&self) -> Result<Config, Problems> {
        let context = Context {
            euid: self.euid,
            config_dir: self.config_dir(),
        };
        load(&self.overrides, &self.env, &context)
    }

    fn problems(&self) -> Vec<String> {
        self.load().unwrap_err().0
    }
}

/// Asserts that some problem contains every one of `parts`.
fn check(problems: &[String], parts: &[&str]) {
    assert!(
        problems
            .iter()
            .any(|p| parts.iter().all(|part| p.contains(part))),
        "no problem mentions all of {parts:?}; problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn one_identity_from_the_file_with_defaults() {
    let setup = Setup::new();
    let path = setup.file("[[identity]]\nissuer = \"you@example.com\"\n");
    let config = setup.load().unwrap();
    assert_eq!(config.file, Some(path));
    assert_eq!(
        config.identities,
        [IdentityConfig {
            name: "default".into(),
            issuer: "you@example.com".into(),
            key: setup.config_dir().join("private.pem"),
            lifetime: Lifetime::MAX,
            default: true,
            allow_insecure_key_permissions: false,
            key_is_credential: false,
            policy: crate::policy::Policy::owner_and_root(1000),
        }]
    );
    assert_eq!(config.socket, PathBuf::from("/xdg/skykit-agent/agent.sock"));
}

#[test]
fn every_identity_field_is_read_and_keys_are_relative_to_the_file() {
    let setup = Setup::new();
    setup.file(
        r#"
socket = "/tmp/a.sock"
[[identity]]
name = "ops"
issuer = "ops@example.com"
key = "keys/ops.pem"
lifetime = "10m"
allow_insecure_key_permissions = true
[[identity]]
name = "ci"
issuer = "ci@example.com"
key = "/abs/ci.pem"
default = true
"#,
    );
    let config = setup.load().unwrap();
    assert_eq!(config.socket, PathBuf::from("/tmp/a.sock"));
    let ops = &config.identities[0];
    assert_eq!(ops.key, setup.config_dir().join("keys/ops.pem"));
    assert_eq!(ops.lifetime.secs(), 600);
    assert!(ops.allow_insecure_key_permissions && !ops.default);
    assert_eq!(config.identities[1].key, PathBuf::from("/abs/ci.pem"));
    assert_eq!(config.default_identity().name, "ci");
}

#[test]
fn flags_alone_define_the_default_identity() {
    let mut setup = Setup::new();
    setup.overrides.issuer = Some("me@example.com".into());
    setup.overrides.key = Some("/k.pem".into());
    setup.overrides.lifetime = Some(Lifetime::from_secs(120).unwrap());
    let config = setup.load().unwrap();
    assert_eq!(config.file, None, "a missing default file is not an error");
    let identity = config.default_identity();
    assert_eq!(
        (
            identity.name.as_str(),
            identity.issuer.as_str(),
            identity.key.as_path()
        ),
        ("default", "me@example.com", Path::new("/k.pem"))
    );
    assert_eq!(identity.lifetime.secs(), 120);
}

#[test]
fn flags_override_the_default_identity_of_the_file() {
    let mut setup = Setup::new();
    setup.file(
        "[[identity]]\nname = \"a\"\nissuer = \"a@x.io\"\n[[identity]]\nname = \"b\"\nissuer = \"b@x.io\"\ndefault = true\n",
    );
    setup.overrides.issuer = Some("new@x.io".into());
    setup.overrides.key = Some("/new.pem".into());
    let config = setup.load().unwrap();
    assert_eq!(config.identities[0].issuer, "a@x.io");
    assert_eq!(config.identities[1].issuer, "new@x.io");
    assert_eq!(config.identities[1].key, PathBuf::from("/new.pem"));
}

#[test]
fn without_any_identity_the_problem_names_the_flag_and_the_file() {
    let setup = Setup::new();
    check(&setup.problems(), &["--issuer", "config.toml"]);
}

#[test]
fn config_file_precedence_is_flag_then_env_then_default() {
    let mut setup = Setup::new();
    setup.file("[[identity]]\nissuer = \"default@x.io\"\n");
    let env_file = setup.dir.path().join("env.toml");
    fs::write(&env_file, "[[identity]]\nissuer = \"env@x.io\"\n").unwrap();
    let flag_file = setup.dir.path().join("flag.toml");
    fs::write(&flag_file, "[[identity]]\nissuer = \"flag@x.io\"\n").unwrap();
    assert_eq!(setup.load().unwrap().identities[0].issuer, "default@x.io");
    setup
        .env
        .insert(ENV_CONFIG.into(), env_file.display().to_string());
    assert_eq!(setup.load().unwrap().identities[0].issuer, "env@x.io");
    setup.overrides.config = Some(flag_file);
    assert_eq!(setup.load().unwrap().identities[0].issuer, "flag@x.io");
}

#[test]
fn a_missing_named_config_file_is_an_error_naming_who_named_it() {
    let mut setup = Setup::new();
    setup.overrides.issuer = Some("me@example.com".into());
    setup
        .env
        .insert(ENV_CONFIG.into(), "/nonexistent/env.toml".into());
    check(
        &setup.problems(),
        &["/nonexistent/env.toml", ENV_CONFIG, "does not exist"],
    );
    setup.overrides.config = Some("/nonexistent/flag.toml".into());
    check(&setup.problems(), &["/nonexistent/flag.toml", "--config"]);
}

#[test]
fn socket_precedence() {
    let mut setup = Setup::new();
    setup.overrides.issuer = Some("me@example.com".into());
    let socket = |setup: &Setup| setup.load().unwrap().socket.display().to_string();
    assert_eq!(socket(&setup), "/xdg/skykit-agent/agent.sock");
    setup.euid = 0;
    assert_eq!(socket(&setup), SYSTEM_SOCKET);
    setup
        .env
        .insert(ENV_RUNTIME_DIRECTORY.into(), "/run/svc:/run/other".into());
    assert_eq!(socket(&setup), "/run/svc/agent.sock");
    setup.file("socket = \"/from/file.sock\"\n[[identity]]\nissuer = \"a@x.io\"\n");
    assert_eq!(socket(&setup), "/from/file.sock");
    setup.env.insert(ENV_SOCKET.into(), "/from/env.sock".into());
    assert_eq!(socket(&setup), "/from/env.sock");
    setup.overrides.socket = Some("/from/flag.sock".into());
    assert_eq!(socket(&setup), "/from/flag.sock");
}

#[test]
fn no_socket_path_at_all_names_the_flag() {
    let mut setup = Setup::new();
    setup.env.clear();
    setup.overrides.issuer = Some("me@example.com".into());
    check(&setup.problems(), &["--socket"]);
}

#[test]
fn every_problem_is_reported_together_with_its_line() {
    let setup = Setup::new();
    let path = setup.file(
        r#"colour = "blue"
[[identity]]
name = "Bad Name"
issuer = "not-an-email"
lifetime = "2h"
[[identity]]
name = "b"
issuer = "b@x.io"
lifetime = 3600
default = "yes"
surprise = 1
"#,
    );
    let problems = setup.problems();
    let file = path.display().to_string();
    check(&problems, &[&format!("{file}:1:"), "unknown key `colour`"]);
    check(&problems, &[&format!("{file}:2:"), "\"Bad Name\"", "a-z"]);
    check(
        &problems,
        &[&format!("{file}:2:"), "not-an-email", "not an email"],
    );
    check(
        &problems,
        &[&format!("{file}:5:"), "lifetime", "7200s", "3600s"],
    );
    check(
        &problems,
        &[&format!("{file}:9:"), "`lifetime` must be a string"],
    );
    check(
        &problems,
        &[&format!("{file}:10:"), "`default` must be true or false"],
    );
    check(
        &problems,
        &[&format!("{file}:11:"), "unknown key `surprise`", "issuer"],
    );
    assert!(problems.len() >= 7, "{problems:#?}");
}

#[test]
fn a_broken_identity_is_not_also_reported_as_missing() {
    let setup = Setup::new();
    setup.file("[[identity]]\nname = \"a\"\n");
    let problems = setup.problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    check(&problems, &["no `issuer`"]);
}

#[test]
fn bad_durations_are_explained() {
    let setup = Setup::new();
    setup.file("[[identity]]\nissuer = \"a@x.io\"\nlifetime = \"ten minutes\"\n");
    check(
        &setup.problems(),
        &[":3:", "\"ten minutes\"", "90s, 10m or 1h"],
    );
    setup.file("[[identity]]\nissuer = \"a@x.io\"\nlifetime = \"30s\"\n");
    check(&setup.problems(), &[":3:", "30s", "minimum of 60s"]);
}

#[test]
fn duplicate_names_and_defaults_are_problems() {
    let setup = Setup::new();
    setup.file(
        "[[identity]]\nname = \"a\"\nissuer = \"a@x.io\"\ndefault = true\n[[identity]]\nname = \"a\"\nissuer = \"b@x.io\"\ndefault = true\n",
    );
    let problems = setup.problems();
    check(&problems, &[":5:", "\"a\" is already used at line 1"]);
    check(
        &problems,
        &["several identities say default = true", "line 1", "line 5"],
    );
}

#[test]
fn several_identities_need_one_default() {
    let setup = Setup::new();
    setup.file("[[identity]]\nname = \"a\"\nissuer = \"a@x.io\"\n[[identity]]\nname = \"b\"\nissuer = \"b@x.io\"\n");
    check(
        &setup.problems(),
        &["2 identities and none says default = true"],
    );
}

#[test]
fn missing_issuer_and_table_instead_of_array() {
    let setup = Setup::new();
    setup.file("[[identity]]\nname = \"a\"\n");
    check(
        &setup.problems(),
        &[":1:", "no `issuer`", "issuer = \"you@example.com\""],
    );
    setup.file("[identity]\nissuer = \"a@x.io\"\n");
    check(&setup.problems(), &["write [[identity]], not [identity]"]);
}

#[test]
fn syntax_errors_name_the_line() {
    let setup = Setup::new();
    setup.file("[[identity]]\nissuer = \"a@x.io\"\nname = \n");
    check(&setup.problems(), &[":3:"]);
}

#[test]
fn a_bad_issuer_flag_names_the_flag() {
    let mut setup = Setup::new();
    setup.overrides.issuer = Some("nobody".into());
    check(
        &setup.problems(),
        &["--issuer", "\"nobody\"", "not an email"],
    );
}

#[test]
fn problems_display_one_per_line() {
    let problems = Problems(vec!["a".into(), "b".into()]);
    assert_eq!(
        problems.to_string(),
        "invalid configuration (2 problems):\n  a\n  b"
    );
    assert_eq!(
        Problems(vec!["a".into()]).to_string(),
        "invalid configuration: a"
    );
}

#[test]
fn without_allow_keys_an_identity_admits_the_agent_user_and_root() {
    let setup = Setup::new();
    setup.file("[[identity]]\nissuer = \"a@x.io\"\n");
    let config = setup.load().unwrap();
    assert_eq!(config.identities[0].policy, Policy::owner_and_root(1000));
}

#[test]
fn allow_lists_resolve_names_when_the_config_loads() {
    let setup = Setup::new();
    setup.file(
        "[[identity]]\nissuer = \"a@x.io\"\nallow_uids = [42]\nallow_gids = [7]\nallow_users = [\"root\"]\nallow_groups = [\"root\"]\n",
    );
    let config = setup.load().unwrap();
    assert_eq!(
        config.identities[0].policy,
        Policy::new(vec![42, 0], vec![7, 0]).unwrap()
    );
}

#[test]
fn unknown_users_and_groups_and_bad_types_are_problems_naming_the_line() {
    let setup = Setup::new();
    setup.file(
        "[[identity]]\nissuer = \"a@x.io\"\nallow_users = [\"no-such-user-xyz\"]\nallow_groups = [\"no-such-group-xyz\"]\nallow_uids = [\"1000\"]\nallow_gids = 7\n",
    );
    let problems = setup.problems();
    check(&problems, &[":3:", "\"no-such-user-xyz\" is not a user"]);
    check(&problems, &[":4:", "\"no-such-group-xyz\" is not a group"]);
    check(&problems, &[":5:", "`allow_uids` holds string", "integers"]);
    check(&problems, &[":6:", "`allow_gids` must be an array"]);
}

#[test]
fn a_policy_that_admits_nobody_is_a_problem() {
    let setup = Setup::new();
    setup.file("[[identity]]\nname = \"locked\"\nissuer = \"a@x.io\"\nallow_uids = []\nallow_groups = []\n");
    check(&setup.problems(), &[":1:", "\"locked\"", "admits nobody"]);
}

#[test]
fn socket_mode_group_and_locked_memory_are_read() {
    let setup = Setup::new();
    setup.file(
        "socket_mode = \"0660\"\nsocket_group = \"root\"\nrequire_locked_memory = true\n[[identity]]\nissuer = \"a@x.io\"\n",
    );
    let config = setup.load().unwrap();
    assert_eq!(config.socket_mode, 0o660);
    assert_eq!(
        config.socket_group,
        Some(Group {
            name: "root".into(),
            gid: 0
        })
    );
    assert!(config.require_locked_memory);
    setup.file("socket_mode = \"0999\"\nsocket_group = \"no-such-group-xyz\"\n[[identity]]\nissuer = \"a@x.io\"\n");
    let problems = setup.problems();
    check(&problems, &[":1:", "\"0999\" is not a file mode"]);
    check(&problems, &[":2:", "not a group on this system"]);
}

#[test]
fn key_credential_reads_from_the_credentials_directory() {
    let mut setup = Setup::new();
    setup.file("[[identity]]\nissuer = \"a@x.io\"\nkey_credential = \"private.pem\"\n");
    check(
        &setup.problems(),
        &[":3:", "$CREDENTIALS_DIRECTORY", "use `key` instead"],
    );
    setup.env.insert(
        ENV_CREDENTIALS_DIRECTORY.into(),
        "/run/credentials/x".into(),
    );
    let config = setup.load().unwrap();
    assert_eq!(
        config.identities[0].key,
        PathBuf::from("/run/credentials/x/private.pem")
    );
    assert!(config.identities[0].key_is_credential);
    setup.file("[[identity]]\nissuer = \"a@x.io\"\nkey = \"k.pem\"\nkey_credential = \"../x\"\n");
    let problems = setup.problems();
    check(&problems, &["not a credential name"]);
}

#[test]
fn sinks_and_metrics_are_read() {
    let setup = Setup::new();
    setup.file(
        r#"
[metrics]
listen = "127.0.0.1:9464"
[[sink]]
path = "token"
[[sink]]
path = "/run/svc/token.json"
identity = "ops"
lifetime = "10m"
mode = "0600"
format = "json"
[[identity]]
name = "ops"
issuer = "a@x.io"
"#,
    );
    let config = setup.load().unwrap();
    assert_eq!(
        config.metrics,
        Some(MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap()))
    );
    assert_eq!(config.sinks.len(), 2);
    assert_eq!(config.sinks[0].path, setup.config_dir().join("token"));
    assert_eq!(config.sinks[0].mode, DEFAULT_SINK_MODE);
    assert_eq!(config.sinks[0].format, SinkFormat::Token);
    let second = &config.sinks[1];
    assert_eq!(
        (
            second.identity.as_str(),
            second.lifetime.map(Lifetime::secs),
            second.mode,
            second.format
        ),
        ("ops", Some(600), 0o600, SinkFormat::Json)
    );
    setup.file("[metrics]\nlisten = \"unix:metrics.sock\"\n[[identity]]\nissuer = \"a@x.io\"\n");
    assert_eq!(
        setup.load().unwrap().metrics,
        Some(MetricsListen::Unix(setup.config_dir().join("metrics.sock")))
    );
}

#[test]
fn bad_sinks_and_metrics_are_problems_naming_the_line() {
    let setup = Setup::new();
    setup.file(
        r#"[metrics]
listen = "0.0.0.0:9464"
[[sink]]
identity = "nope"
format = "yaml"
owner = "root"
group = "no-such-group-xyz"
[[sink]]
path = "/a"
[[sink]]
path = "/a"
[[identity]]
issuer = "a@x.io"
"#,
    );
    let problems = setup.problems();
    check(&problems, &[":2:", "not a loopback address"]);
    check(&problems, &[":3:", "[[sink]] has no `path`"]);
    check(&problems, &[":5:", "\"yaml\" is not \"token\" or \"json\""]);
    check(
        &problems,
        &[":6:", "`owner` needs the agent to run as root", "uid 1000"],
    );
    check(&problems, &[":7:", "not a group on this system"]);
    check(&problems, &["two [[sink]] sections write /a"]);
}

#[test]
fn a_sink_must_name_a_configured_identity() {
    let setup = Setup::new();
    setup.file("[[sink]]\npath = \"/t\"\nidentity = \"nope\"\n[[identity]]\nissuer = \"a@x.io\"\n");
    check(
        &setup.problems(),
        &["[[sink]] /t names identity \"nope\"", "it has: default"],
    );
}

#[test]
fn proxy_defaults_and_every_key_are_read() {
    let setup = Setup::new();
    setup.file("[proxy]\nlisten = \"unix:proxy.sock\"\n[[identity]]\nissuer = \"a@x.io\"\n");
    let proxy = setup.load().unwrap().proxy.expect("a [proxy]");
    assert_eq!(
        proxy,
        ProxyConfig {
            listen: ProxyListen::Unix(setup.config_dir().join("proxy.sock")),
            upstream: DEFAULT_PROXY_UPSTREAM.parse().unwrap(),
            identity: String::new(),
            timeout: DEFAULT_PROXY_TIMEOUT,
            retry_min_token_age: DEFAULT_PROXY_RETRY_MIN_TOKEN_AGE,
            allow_any_local_user: false,
            ca_file: None,
        }
    );
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    fs::write(setup.config_dir().join("ca.pem"), ca.cert.pem()).unwrap();
    setup.file(
        r#"
[proxy]
listen = "[::1]:8181"
upstream = "http://localhost:8080"
identity = "ops"
timeout = "1m"
retry_min_token_age = "0s"
allow_any_local_user = true
ca_file = "ca.pem"
[[identity]]
name = "ops"
issuer = "a@x.io"
"#,
    );
    let proxy = setup.load().unwrap().proxy.expect("a [proxy]");
    assert_eq!(
        proxy.listen,
        ProxyListen::Tcp("[::1]:8181".parse().unwrap())
    );
    assert_eq!(proxy.upstream.to_string(), "http://localhost:8080/");
    assert_eq!(proxy.identity, "ops");
    assert_eq!(proxy.timeout, std::time::Duration::from_secs(60));
    assert_eq!(proxy.retry_min_token_age, std::time::Duration::ZERO);
    assert!(proxy.allow_any_local_user);
    assert_eq!(proxy.ca_file, Some(setup.config_dir().join("ca.pem")));
    assert_eq!(setup.load().unwrap().metrics, None);
}

#[test]
fn a_tcp_proxy_needs_allow_any_local_user() {
    let setup = Setup::new();
    setup.file("[[identity]]\nissuer = \"a@x.io\"\n[proxy]\nlisten = \"127.0.0.1:8181\"\n");
    check(
        &setup.problems(),
        &[":3:", "127.0.0.1:8181", "set allow_any_local_user = true"],
    );
}

#[test]
fn bad_proxy_settings_are_problems_naming_the_line() {
    let setup = Setup::new();
    setup.file(
        r#"[proxy]
listen = "0.0.0.0:8181"
upstream = "http://skykit.example"
timeout = "0s"
retry_min_token_age = "soon"
allow_any_local_user = "yes"
ca_file = "missing.pem"
color = "blue"
[[identity]]
issuer = "a@x.io"
"#,
    );
    let problems = setup.problems();
    check(
        &problems,
        &[":2:", "0.0.0.0:8181 is not a loopback address"],
    );
    check(&problems, &[":3:", "plain http", "in the clear"]);
    check(&problems, &[":4:", "`timeout` must be at least 1s"]);
    check(&problems, &[":5:", "`retry_min_token_age`", "\"soon\""]);
    check(
        &problems,
        &[":6:", "`allow_any_local_user` must be true or false"],
    );
    check(
        &problems,
        &[":7:", "`ca_file`", "missing.pem", "cannot read it"],
    );
    check(&problems, &[":8:", "unknown key `color` in [proxy]"]);
    for (upstream, why) in [
        ("https://user@host", "user info"),
        ("https://host/base", "has a path or query"),
        ("ftp://host", "neither https nor http"),
        ("skykit", "not an absolute URL"),
    ] {
        let error = parse_upstream(upstream).unwrap_err();
        assert!(error.contains(why), "{upstream}: {error}");
    }
    assert!(parse_upstream("http://127.0.0.1:8080").is_ok());
    assert!(parse_upstream("http://[::1]:8080").is_ok());
}

#[test]
fn the_proxy_must_name_a_configured_identity() {
    let setup = Setup::new();
    setup.file("[proxy]\nlisten = \"unix:p.sock\"\nidentity = \"nope\"\n[[identity]]\nissuer = \"a@x.io\"\n");
    check(
        &setup.problems(),
        &["[proxy] names identity \"nope\"", "it has: default"],
    );
    setup.file("[proxy]\nlisten = \"unix:p.sock\"\nidentity = \"default\"\n");
    let mut setup = setup;
    setup.overrides.issuer = Some("a@x.io".into());
    assert!(setup.load().is_ok(), "the flags define `default`");
    setup.file("[proxy]\nidentity = \"default\"\n");
    check(&setup.problems(), &[":1:", "[proxy] has no `listen`"]);
}
