//! The agent's configuration: the TOML file, environment and flags resolved
//! once, before anything binds, into one immutable [`Config`].
//!
//! Precedence is flags, then environment (`SKYKIT_AGENT_*`), then the file,
//! then defaults. Every problem found is reported together, each naming the
//! file and line (or the flag) and how to fix it.

use std::{
    collections::HashMap,
    ffi::OsString,
    fmt, fs, io,
    path::{Path, PathBuf},
};

use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use crate::{duration, limits::Limits, policy::Policy, token::Lifetime};

/// Names the config file to read instead of the default.
pub const ENV_CONFIG: &str = "SKYKIT_AGENT_CONFIG";
/// Names the agent's socket, for `serve` and every client.
pub const ENV_SOCKET: &str = "SKYKIT_AGENT_SOCKET";
/// Set by systemd to the service's runtime directory.
pub const ENV_RUNTIME_DIRECTORY: &str = "RUNTIME_DIRECTORY";
/// Set by systemd to the folder of the service's credentials (`LoadCredential=`).
pub const ENV_CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
/// The per-user runtime directory (`/run/user/UID`).
pub const ENV_XDG_RUNTIME_DIR: &str = "XDG_RUNTIME_DIR";
/// Where root keeps the config and the key.
pub const SYSTEM_CONFIG_DIR: &str = "/etc/skykit-agent";
/// Where root's agent listens, and the last place clients look.
pub const SYSTEM_SOCKET: &str = "/run/skykit-agent/agent.sock";
/// The socket's folder under `$XDG_RUNTIME_DIR`.
pub const USER_SOCKET_DIR: &str = "skykit-agent";
/// The socket's file name in any runtime directory.
pub const SOCKET_FILE: &str = "agent.sock";
/// The config file's name in the config dir.
pub const CONFIG_FILE: &str = "config.toml";
/// The default key file's name in the config dir.
pub const KEY_FILE: &str = "private.pem";
/// The identity that flags alone define.
pub const DEFAULT_IDENTITY: &str = "default";
/// Only the agent's own user may connect unless the config says otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Reads environment variables; tests pass a map instead of the process's.
pub trait Env {
    fn var(&self, name: &str) -> Option<OsString>;

    /// The variable when it is set and not empty.
    fn non_empty(&self, name: &str) -> Option<OsString> {
        self.var(name).filter(|value| !value.is_empty())
    }
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<OsString> {
        self.get(name).map(OsString::from)
    }
}

/// The resolved configuration of `serve`, `check` and `pubkey`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
    /// Where the agent listens.
    pub socket: PathBuf,
    /// The mode of a socket the agent binds itself (not of one systemd passes).
    pub socket_mode: u32,
    /// The group given a socket the agent binds itself, and its directory.
    pub socket_group: Option<Group>,
    /// Refuse to start (or reload) when key memory cannot be locked in RAM.
    pub require_locked_memory: bool,
    /// Bounds on messages, streams, connections and signatures.
    pub limits: Limits,
    /// Files the agent keeps a current token in.
    pub sinks: Vec<SinkConfig>,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics: Option<MetricsListen>,
    /// The authenticating HTTP proxy to Skykit API, if configured.
    pub proxy: Option<ProxyConfig>,
    /// Invariant: not empty, names unique, exactly one marked default.
    pub identities: Vec<IdentityConfig>,
}

/// One `[[sink]]`: a file the agent keeps a current token in, rewritten
/// atomically at start and at each refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub path: PathBuf,
    /// The identity's name (checked against the `[[identity]]` names).
    pub identity: String,
    /// `None`: the identity's default lifetime.
    pub lifetime: Option<Lifetime>,
    pub mode: u32,
    /// Only when the agent runs as root.
    pub owner: Option<u32>,
    /// One of the agent's own groups (any group when it runs as root).
    pub group: Option<Group>,
    pub format: SinkFormat,
}

/// What a sink file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFormat {
    /// The bare token and a newline.
    Token,
    /// The token and its times, as `token --json` prints them.
    Json,
}

/// Where the metrics listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `HOST:PORT` on a loopback address.
    Tcp(std::net::SocketAddr),
}

/// `[proxy]`: an HTTP listener that forwards requests to Skykit API with
/// the agent's token attached (see `proxy.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listen: ProxyListen,
    /// Invariant: `https://` or `http://` with a loopback host, an origin
    /// only (no user info, path or query).
    pub upstream: hyper::Uri,
    /// The identity whose token is attached; empty means the default one.
    pub identity: String,
    /// Bounds connecting, sending the request and receiving the response
    /// headers, and then each pause in the response body.
    pub timeout: std::time::Duration,
    /// A 401 is retried with a new token only when the token sent was at
    /// least this old; zero retries every 401 (once).
    pub retry_min_token_age: std::time::Duration,
    /// Accept a TCP listener, which any local user can reach.
    /// Invariant: true whenever `listen` is TCP.
    pub allow_any_local_user: bool,
    /// Extra trusted CA certificates (PEM) besides the built-in roots.
    pub ca_file: Option<PathBuf>,
}

/// Where the proxy listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyListen {
    /// `unix:PATH`, bound with the agent socket's mode and group.
    Unix(PathBuf),
    /// `HOST:PORT` on a loopback address; port 0 picks a free port.
    Tcp(std::net::SocketAddr),
}

/// Where the proxy forwards unless `upstream` says otherwise.
pub const DEFAULT_PROXY_UPSTREAM: &str = "https://skykit-provisioning.appspot.com";
/// How long the proxy waits for the upstream unless `timeout` says otherwise.
pub const DEFAULT_PROXY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How old a token must be for a 401 to be retried with a new one, unless
/// `retry_min_token_age` says otherwise: younger tokens are not the problem.
pub const DEFAULT_PROXY_RETRY_MIN_TOKEN_AGE: std::time::Duration =
    std::time::Duration::from_secs(60);

/// The mode of a sink file unless `mode` says otherwise.
pub const DEFAULT_SINK_MODE: u32 = 0o640;

/// A group the socket is given, resolved when the config loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

/// One `[[identity]]`: an issuer and the key that signs for it.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityConfig {
    pub name: String,
    pub issuer: String,
    /// The key file: `key`, or `key_credential` inside `$CREDENTIALS_DIRECTORY`.
    pub key: PathBuf,
    pub lifetime: Lifetime,
    pub default: bool,
    pub allow_insecure_key_permissions: bool,
    /// The key is a systemd credential: systemd controls its access, so
    /// its permissions are not checked.
    pub key_is_credential: bool,
    /// Who may use this identity; without `allow_*` keys, the agent's own
    /// uid and root.
    pub policy: Policy,
}

impl Config {
    /// The identity an empty `identity` in a request means.
    pub fn default_identity(&self) -> &IdentityConfig {
        self.identities
            .iter()
            .find(|identity| identity.default)
            .unwrap_or(&self.identities[0])
    }
}

/// What the command line says; `None` leaves the choice to env and file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub issuer: Option<String>,
    pub lifetime: Option<Lifetime>,
}

/// Facts about the process that decide the defaults.
#[derive(Debug, Clone)]
pub struct Context {
    /// The effective uid: root gets system-wide paths.
    pub euid: u32,
    /// Where the config file and the default key live.
    pub config_dir: PathBuf,
}

impl Context {
    /// The current process: `/etc/skykit-agent` for root, else the user's
    /// config dir (`~/.config/skykit-agent`).
    pub fn current() -> Self {
        let euid = rustix::process::geteuid().as_raw();
        Context {
            euid,
            config_dir: default_config_dir(euid),
        }
    }
}

/// The config dir for `euid`.
pub fn default_config_dir(euid: u32) -> PathBuf {
    if euid == 0 {
        return PathBuf::from(SYSTEM_CONFIG_DIR);
    }
    directories::ProjectDirs::from("", "", "skykit-agent")
        .map(|dirs| dirs.config_dir().to_owned())
        .unwrap_or_else(|| PathBuf::from(SYSTEM_CONFIG_DIR))
}

/// Every problem with the configuration, reported together.
#[derive(Debug, Clone, PartialEq)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for problem in many {
                    write!(f, "\n  {problem}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Problems {}

/// Resolves the configuration from flags, environment and file.
pub fn load(overrides: &Overrides, env: &dyn Env, context: &Context) -> Result<Config, Problems> {
    let mut problems = Vec::new();
    let file = config_file(overrides, env, context, &mut problems);
    let credentials = env.non_empty(ENV_CREDENTIALS_DIRECTORY).map(PathBuf::from);
    let parsed = match &file {
        Some((path, text)) => parse_file(
            path,
            text,
            credentials.as_deref(),
            context.euid,
            &mut problems,
        ),
        None => FileSettings::default(),
    };
    let socket_in_file = parsed.socket;
    let mut identities = parsed.identities;
    if !parsed.declares_identities {
        add_identity_from_flags(overrides, context, &mut identities, &mut problems);
    }
    apply_overrides(overrides, &mut identities, &mut problems);
    let socket = socket_path(overrides, env, context, socket_in_file, &mut problems);
    match socket {
        Some(socket) if problems.is_empty() => Ok(Config {
            file: file.map(|(path, _)| path),
            socket,
            socket_mode: parsed.socket_mode.unwrap_or(DEFAULT_SOCKET_MODE),
            socket_group: parsed.socket_group,
            require_locked_memory: parsed.require_locked_memory,
            limits: parsed.limits,
            sinks: parsed.sinks,
            metrics: parsed.metrics,
            proxy: parsed.proxy,
            identities,
        }),
        _ => Err(Problems(problems)),
    }
}

/// The file to read and its text. A missing file named by `--config` or the
/// environment is a problem; a missing default file is not.
fn config_file(
    overrides: &Overrides,
    env: &dyn Env,
    context: &Context,
    problems: &mut Vec<String>,
) -> Option<(PathBuf, String)> {
    let (path, named_by) = if let Some(path) = &overrides.config {
        (path.clone(), Some("--config"))
    } else if let Some(path) = env.non_empty(ENV_CONFIG) {
        (PathBuf::from(path), Some(ENV_CONFIG))
    } else {
        (context.config_dir.join(CONFIG_FILE), None)
    };
    match fs::read_to_string(&path) {
        Ok(text) => Some((path, text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound && named_by.is_none() => None,
        Err(error) => {
            let named_by = named_by
                .map(|by| format!(" (named by {by})"))
                .unwrap_or_default();
            let reason = match error.kind() {
                io::ErrorKind::NotFound => "it does not exist; check the path".to_owned(),
                _ => error.to_string(),
            };
            problems.push(format!(
                "cannot read config file {}{named_by}: {reason}",
                path.display()
            ));
            None
        }
    }
}

/// An `[[identity]]` as written, with the line it starts on.
struct RawIdentity {
    line: usize,
    identity: IdentityConfig,
}

/// What the file sets; `None` leaves the choice to flags and defaults.
#[derive(Default)]
struct FileSettings {
    socket: Option<PathBuf>,
    socket_mode: Option<u32>,
    socket_group: Option<Group>,
    require_locked_memory: bool,
    limits: Limits,
    sinks: Vec<SinkConfig>,
    metrics: Option<MetricsListen>,
    proxy: Option<ProxyConfig>,
    identities: Vec<IdentityConfig>,
    /// The file has `[[identity]]` sections, even if some were invalid.
    declares_identities: bool,
}

fn parse_file(
    path: &Path,
    text: &str,
    credentials: Option<&Path>,
    euid: u32,
    problems: &mut Vec<String>,
) -> FileSettings {
    let at =
        |span: std::ops::Range<usize>| format!("{}:{}", path.display(), line_of(text, span.start));
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    for error in syntax_errors {
        let line = error.span().map_or(1, |span| line_of(text, span.start));
        problems.push(format!(
            "{}:{line}: {}",
            path.display(),
            error.message().trim_end()
        ));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut settings = FileSettings::default();
    let mut raw = Vec::new();
    for (key, value) in document.get_ref() {
        let here = at(key.span());
        match key.get_ref().as_ref() {
            "socket" => {
                if let Some(text) = expect_str(value, &here, "socket", problems) {
                    settings.socket = Some(base.join(text));
                }
            }
            "socket_mode" => {
                if let Some(text) = expect_str(value, &here, "socket_mode", problems) {
                    match parse_mode(text) {
                        Ok(mode) => settings.socket_mode = Some(mode),
                        Err(problem) => problems.push(format!("{here}: {problem}")),
                    }
                }
            }
            "socket_group" => {
                if let Some(text) = expect_str(value, &here, "socket_group", problems) {
                    match resolve_group(text) {
                        Ok(group) => settings.socket_group = Some(group),
                        Err(problem) => problems.push(format!("{here}: {problem}")),
                    }
                }
            }
            "sink" => match value.get_ref() {
                DeValue::Array(tables) => {
                    for table in tables.iter() {
                        let here = at(table.span());
                        match table.get_ref() {
                            DeValue::Table(fields) => {
                                if let Some(sink) = parse_sink(fields, base, euid, &at, &here, problems) {
                                    settings.sinks.push(sink);
                                }
                            }
                            _ => problems.push(format!("{here}: each `sink` must be a table: write [[sink]] sections")),
                        }
                    }
                }
                _ => problems.push(format!("{here}: `sink` must be an array of tables: write [[sink]], not [sink]")),
            },
            "metrics" => match value.get_ref() {
                DeValue::Table(fields) => settings.metrics = parse_metrics(fields, base, &at, problems),
                _ => problems.push(format!("{here}: `metrics` must be a table: write [metrics]")),
            },
            "proxy" => match value.get_ref() {
                DeValue::Table(fields) => settings.proxy = parse_proxy(fields, base, &at, &here, problems),
                _ => problems.push(format!("{here}: `proxy` must be a table: write [proxy]")),
            },
            "limits" => match value.get_ref() {
                DeValue::Table(fields) => parse_limits(fields, &mut settings.limits, &at, problems),
                _ => problems.push(format!("{here}: `limits` must be a table: write [limits]")),
            },
            "require_locked_memory" => {
                settings.require_locked_memory =
                    expect_bool(value, &here, "require_locked_memory", problems).unwrap_or(false)
            }
            "identity" => match value.get_ref() {
                DeValue::Array(tables) => {
                    settings.declares_identities |= !tables.is_empty();
                    for table in tables.iter() {
                        let here = at(table.span());
                        match table.get_ref() {
                            DeValue::Table(fields) => {
                                if let Some(identity) =
                                    parse_identity(fields, base, credentials, euid, &at, &here, problems)
                                {
                                    raw.push(RawIdentity {
                                        line: line_of(text, table.span().start),
                                        identity,
                                    });
                                }
                            }
                            _ => problems.push(format!("{here}: each `identity` must be a table: write [[identity]] sections")),
                        }
                    }
                }
                _ => problems.push(format!(
                    "{here}: `identity` must be an array of tables: write [[identity]], not [identity]"
                )),
            },
            other => problems.push(format!(
                "{here}: unknown key `{other}`; expected one of: {TOP_LEVEL_KEYS}"
            )),
        }
    }
    check_duplicates(path, &raw, problems);
    check_sinks(path, &settings.sinks, &raw, problems);
    if !settings.declares_identities || !raw.is_empty() {
        check_proxy(path, settings.proxy.as_ref(), &raw, problems);
    }
    let single = raw.len() == 1;
    settings.identities = raw
        .into_iter()
        .map(|mut raw| {
            // One identity is the default whether or not it says so.
            raw.identity.default |= single;
            raw.identity
        })
        .collect();
    settings
}

const TOP_LEVEL_KEYS: &str = "socket, socket_mode, socket_group, require_locked_memory, limits, metrics, proxy, sink, identity";
const SINK_KEYS: &str = "path, identity, lifetime, mode, owner, group, format";

/// Reads one `[[sink]]`.
fn parse_sink(
    fields: &DeTable<'_>,
    base: &Path,
    euid: u32,
    at: &dyn Fn(std::ops::Range<usize>) -> String,
    here: &str,
    problems: &mut Vec<String>,
) -> Option<SinkConfig> {
    let before = problems.len();
    let mut sink = SinkConfig {
        path: PathBuf::new(),
        identity: String::new(),
        lifetime: None,
        mode: DEFAULT_SINK_MODE,
        owner: None,
        group: None,
        format: SinkFormat::Token,
    };
    for (field, value) in fields {
        let where_ = at(field.span());
        let name = field.get_ref().as_ref();
        let Some(text) = expect_str(value, &where_, name, problems) else {
            continue;
        };
        match name {
            "path" => sink.path = base.join(text),
            "identity" => sink.identity = text.to_owned(),
            "lifetime" => match parse_lifetime(text) {
                Ok(lifetime) => sink.lifetime = Some(lifetime),
                Err(error) => problems.push(format!("{where_}: `lifetime`: {error}")),
            },
            "mode" => match parse_mode(text) {
                Ok(mode) => sink.mode = mode,
                Err(problem) => problems.push(format!("{where_}: {}", problem.replace("socket_mode", "mode"))),
            },
            "owner" if euid != 0 => problems.push(format!(
                "{where_}: `owner` needs the agent to run as root (it runs as uid {euid}); leave it out, and the file belongs to the agent's user"
            )),
            "owner" => match text.parse::<u32>().ok().or_else(|| {
                nix::unistd::User::from_name(text).ok().flatten().map(|user| user.uid.as_raw())
            }) {
                Some(uid) => sink.owner = Some(uid),
                None => problems.push(format!("{where_}: `owner` {text:?} is not a user on this system")),
            },
            "group" => match resolve_group(text) {
                Ok(group) if euid == 0 || own_groups().contains(&group.gid) => sink.group = Some(group),
                Ok(group) => problems.push(format!(
                    "{where_}: `group` {text:?} (gid {}) is not one of the agent's own groups, so it cannot give a file to it: add the agent's user to the group or leave `group` out",
                    group.gid
                )),
                Err(problem) => problems.push(format!("{where_}: {}", problem.replace("socket_group", "group"))),
            },
            "format" => match text {
                "token" => sink.format = SinkFormat::Token,
                "json" => sink.format = SinkFormat::Json,
                other => problems.push(format!("{where_}: `format` {other:?} is not \"token\" or \"json\"")),
            },
            other => problems.push(format!(
                "{where_}: unknown key `{other}` in [[sink]]; expected one of: {SINK_KEYS}"
            )),
        }
    }
    if sink.path.as_os_str().is_empty() {
        problems.push(format!(
            "{here}: [[sink]] has no `path`: add path = \"/run/myservice/skykit-token\""
        ));
    }
    (problems.len() == before).then_some(sink)
}

/// The groups a file of the agent's may be given without root.
fn own_groups() -> Vec<u32> {
    let mut groups: Vec<u32> = rustix::process::getgroups()
        .unwrap_or_default()
        .into_iter()
        .map(|gid| gid.as_raw())
        .collect();
    groups.push(rustix::process::getegid().as_raw());
    groups
}

/// Sinks name existing identities and distinct files.
fn check_sinks(
    path: &Path,
    sinks: &[SinkConfig],
    identities: &[RawIdentity],
    problems: &mut Vec<String>,
) {
    let names: Vec<&str> = identities
        .iter()
        .map(|raw| raw.identity.name.as_str())
        .collect();
    let default = identities
        .iter()
        .find(|raw| raw.identity.default || identities.len() == 1)
        .map(|raw| raw.identity.name.as_str());
    let mut seen = Vec::new();
    for sink in sinks {
        let name = if sink.identity.is_empty() {
            default.unwrap_or(DEFAULT_IDENTITY)
        } else {
            &sink.identity
        };
        if !identities.is_empty() && !names.contains(&name) {
            problems.push(format!(
                "{}: [[sink]] {} names identity {name:?}, which is not an [[identity]] here; it has: {}",
                path.display(),
                sink.path.display(),
                names.join(", ")
            ));
        }
        if seen.contains(&&sink.path) {
            problems.push(format!(
                "{}: two [[sink]] sections write {}: give each its own file",
                path.display(),
                sink.path.display()
            ));
        }
        seen.push(&sink.path);
    }
}

/// Reads `[metrics]`.
fn parse_metrics(
    fields: &DeTable<'_>,
    base: &Path,
    at: &dyn Fn(std::ops::Range<usize>) -> String,
    problems: &mut Vec<String>,
) -> Option<MetricsListen> {
    let mut listen = None;
    for (field, value) in fields {
        let where_ = at(field.span());
        match field.get_ref().as_ref() {
            "listen" => {
                let Some(text) = expect_str(value, &where_, "listen", problems) else {
                    continue;
                };
                if let Some(path) = text.strip_prefix("unix:") {
                    listen = Some(MetricsListen::Unix(base.join(path)));
                } else {
                    match text.parse::<std::net::SocketAddr>() {
                        Ok(address) if address.ip().is_loopback() => listen = Some(MetricsListen::Tcp(address)),
                        Ok(address) => problems.push(format!(
                            "{where_}: metrics `listen` {address} is not a loopback address: use 127.0.0.1:PORT, [::1]:PORT or unix:PATH (put a proxy in front to export further)"
                        )),
                        Err(_) => problems.push(format!(
                            "{where_}: metrics `listen` {text:?} is neither unix:PATH nor HOST:PORT, such as \"127.0.0.1:9464\""
                        )),
                    }
                }
            }
            other => problems.push(format!(
                "{where_}: unknown key `{other}` in [metrics]; expected: listen"
            )),
        }
    }
    listen
}

const PROXY_KEYS: &str =
    "listen, upstream, identity, timeout, retry_min_token_age, allow_any_local_user, ca_file";

/// Reads `[proxy]`; `here` is the table's line, for problems of the whole.
fn parse_proxy(
    fields: &DeTable<'_>,
    base: &Path,
    at: &dyn Fn(std::ops::Range<usize>) -> String,
    here: &str,
    problems: &mut Vec<String>,
) -> Option<ProxyConfig> {
    let before = problems.len();
    let mut listen = None;
    let mut upstream = None;
    let mut identity = String::new();
    let mut timeout = DEFAULT_PROXY_TIMEOUT;
    let mut retry_min_token_age = DEFAULT_PROXY_RETRY_MIN_TOKEN_AGE;
    let mut allow_any_local_user = false;
    let mut ca_file = None;
    for (field, value) in fields {
        let where_ = at(field.span());
        match field.get_ref().as_ref() {
            "listen" => {
                if let Some(text) = expect_str(value, &where_, "listen", problems) {
                    match parse_proxy_listen(text, base) {
                        Ok(parsed) => listen = Some(parsed),
                        Err(problem) => problems.push(format!("{where_}: {problem}")),
                    }
                }
            }
            "upstream" => {
                if let Some(text) = expect_str(value, &where_, "upstream", problems) {
                    match parse_upstream(text) {
                        Ok(parsed) => upstream = Some(parsed),
                        Err(problem) => problems.push(format!("{where_}: {problem}")),
                    }
                }
            }
            "identity" => {
                if let Some(text) = expect_str(value, &where_, "identity", problems) {
                    identity = text.to_owned();
                }
            }
            "timeout" => {
                if let Some(parsed) = expect_duration(value, &where_, "timeout", problems) {
                    timeout = parsed;
                }
            }
            "retry_min_token_age" => {
                if let Some(text) = expect_str(value, &where_, "retry_min_token_age", problems) {
                    match duration::parse(text) {
                        Ok(parsed) => retry_min_token_age = parsed,
                        Err(error) => {
                            problems.push(format!("{where_}: `retry_min_token_age`: {error}"))
                        }
                    }
                }
            }
            "allow_any_local_user" => {
                allow_any_local_user =
                    expect_bool(value, &where_, "allow_any_local_user", problems).unwrap_or(false)
            }
            "ca_file" => {
                if let Some(text) = expect_str(value, &where_, "ca_file", problems) {
                    let path = base.join(text);
                    match crate::proxy::read_ca_file(&path) {
                        Ok(_) => ca_file = Some(path),
                        Err(problem) => problems.push(format!("{where_}: `ca_file`: {problem}")),
                    }
                }
            }
            other => problems.push(format!(
                "{where_}: unknown key `{other}` in [proxy]; expected one of: {PROXY_KEYS}"
            )),
        }
    }
    let Some(listen) = listen else {
        if problems.len() == before {
            problems.push(format!(
                "{here}: [proxy] has no `listen`: add listen = \"unix:/run/skykit-agent/proxy.sock\" (or a loopback HOST:PORT)"
            ));
        }
        return None;
    };
    if let ProxyListen::Tcp(address) = listen
        && !allow_any_local_user
    {
        problems.push(format!(
            "{here}: [proxy] listens on TCP {address}, where every local user can connect and the agent cannot tell who: set allow_any_local_user = true to accept that, or listen on unix:PATH, where the identity's allow_* policy applies"
        ));
    }
    let upstream = match upstream {
        Some(upstream) => upstream,
        None => parse_upstream(DEFAULT_PROXY_UPSTREAM).ok()?,
    };
    (problems.len() == before).then_some(ProxyConfig {
        listen,
        upstream,
        identity,
        timeout,
        retry_min_token_age,
        allow_any_local_user,
        ca_file,
    })
}

/// `unix:PATH` (relative to the config file's folder) or a loopback
/// `HOST:PORT`.
fn parse_proxy_listen(text: &str, base: &Path) -> Result<ProxyListen, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(
                "proxy `listen` \"unix:\" names no path: write unix:/run/skykit-agent/proxy.sock"
                    .to_owned(),
            );
        }
        return Ok(ProxyListen::Unix(base.join(path)));
    }
    match text.parse::<std::net::SocketAddr>() {
        Ok(address) if address.ip().is_loopback() => Ok(ProxyListen::Tcp(address)),
        Ok(address) => Err(format!(
            "proxy `listen` {address} is not a loopback address: use 127.0.0.1:PORT, [::1]:PORT or unix:PATH; the proxy hands out the agent's credentials and must not be reachable from other hosts"
        )),
        Err(_) => Err(format!(
            "proxy `listen` {text:?} is neither unix:PATH nor HOST:PORT, such as \"unix:/run/skykit-agent/proxy.sock\" or \"127.0.0.1:8181\""
        )),
    }
}

/// An upstream origin: `https://HOST[:PORT]`, or `http://` to a loopback
/// host only, since plain HTTP would carry the token in the clear.
pub fn parse_upstream(text: &str) -> Result<hyper::Uri, String> {
    let invalid = |why: &str| {
        format!(
            "proxy `upstream` {text:?} {why}: write an origin such as {DEFAULT_PROXY_UPSTREAM:?}"
        )
    };
    let uri: hyper::Uri = text.parse().map_err(|_| invalid("is not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(invalid("is not an absolute URL"));
    };
    if authority.as_str().contains('@') {
        return Err(invalid("carries user info"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid(
            "has a path or query; the proxy forwards each request's own path",
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match scheme {
        "https" => Ok(uri),
        "http" if loopback => Ok(uri),
        "http" => Err(invalid(
            "is plain http to a host that is not loopback, which would send the token in the clear; use https",
        )),
        _ => Err(invalid("is neither https nor http")),
    }
}

/// The proxy names an existing identity (with no `[[identity]]` at all,
/// the one the flags define).
fn check_proxy(
    path: &Path,
    proxy: Option<&ProxyConfig>,
    identities: &[RawIdentity],
    problems: &mut Vec<String>,
) {
    let Some(proxy) = proxy else {
        return;
    };
    if proxy.identity.is_empty() {
        return;
    }
    // Without [[identity]] sections the flags define the one identity.
    let mut names: Vec<&str> = identities
        .iter()
        .map(|raw| raw.identity.name.as_str())
        .collect();
    if names.is_empty() {
        names.push(DEFAULT_IDENTITY);
    }
    if !names.contains(&proxy.identity.as_str()) {
        problems.push(format!(
            "{}: [proxy] names identity {:?}, which is not an [[identity]] here; it has: {}",
            path.display(),
            proxy.identity,
            names.join(", ")
        ));
    }
}

const LIMIT_KEYS: &str = "max_message_bytes, max_concurrent_streams, max_calls_per_connection, request_timeout, keepalive_interval, keepalive_timeout, max_header_list_bytes, max_connections, handshake_timeout, new_signatures_per_uid_per_minute, drain_timeout";

/// Reads `[limits]`; each value must be a positive integer or a duration
/// of at least one second.
fn parse_limits(
    fields: &DeTable<'_>,
    limits: &mut Limits,
    at: &dyn Fn(std::ops::Range<usize>) -> String,
    problems: &mut Vec<String>,
) {
    for (field, value) in fields {
        let here = at(field.span());
        let name = field.get_ref().as_ref();
        let count = |problems: &mut Vec<String>| expect_count(value, &here, name, problems);
        let time = |problems: &mut Vec<String>| expect_duration(value, &here, name, problems);
        match name {
            "max_message_bytes" => count(problems).map(|n| limits.max_message_bytes = n as usize),
            "max_concurrent_streams" => count(problems).map(|n| limits.max_concurrent_streams = n),
            "max_calls_per_connection" => {
                count(problems).map(|n| limits.max_calls_per_connection = n as usize)
            }
            "max_header_list_bytes" => count(problems).map(|n| limits.max_header_list_bytes = n),
            "max_connections" => count(problems).map(|n| limits.max_connections = n as usize),
            "new_signatures_per_uid_per_minute" => {
                count(problems).map(|n| limits.new_signatures_per_uid_per_minute = n)
            }
            "request_timeout" => time(problems).map(|d| limits.request_timeout = d),
            "keepalive_interval" => time(problems).map(|d| limits.keepalive_interval = d),
            "keepalive_timeout" => time(problems).map(|d| limits.keepalive_timeout = d),
            "handshake_timeout" => time(problems).map(|d| limits.handshake_timeout = d),
            "drain_timeout" => time(problems).map(|d| limits.drain_timeout = d),
            other => {
                problems.push(format!(
                    "{here}: unknown key `{other}` in [limits]; expected one of: {LIMIT_KEYS}"
                ));
                None
            }
        };
    }
}

fn expect_count(
    value: &Spanned<DeValue<'_>>,
    here: &str,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<u32> {
    let parsed = match value.get_ref() {
        DeValue::Integer(number) => number.as_str().parse::<u32>().ok().filter(|&n| n > 0),
        _ => None,
    };
    if parsed.is_none() {
        problems.push(format!(
            "{here}: `{name}` must be a positive whole number (at most 4294967295), not {}",
            describe_value(value)
        ));
    }
    parsed
}

fn expect_duration(
    value: &Spanned<DeValue<'_>>,
    here: &str,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<std::time::Duration> {
    let DeValue::String(text) = value.get_ref() else {
        problems.push(format!(
            "{here}: `{name}` must be a duration string such as \"5s\", not {}",
            describe_value(value)
        ));
        return None;
    };
    match duration::parse(text) {
        Ok(parsed) if parsed.as_secs() >= 1 => Some(parsed),
        Ok(_) => {
            problems.push(format!("{here}: `{name}` must be at least 1s"));
            None
        }
        Err(error) => {
            problems.push(format!("{here}: `{name}`: {error}"));
            None
        }
    }
}

fn describe_value(value: &Spanned<DeValue<'_>>) -> String {
    match value.get_ref() {
        DeValue::Integer(number) => number.as_str().to_owned(),
        DeValue::String(text) => format!("{text:?}"),
        other => other.type_str().to_owned(),
    }
}
const IDENTITY_KEYS: &str = "name, issuer, key, key_credential, lifetime, default, allow_insecure_key_permissions, allow_uids, allow_gids, allow_users, allow_groups";

fn parse_identity(
    fields: &DeTable<'_>,
    base: &Path,
    credentials: Option<&Path>,
    euid: u32,
    at: &dyn Fn(std::ops::Range<usize>) -> String,
    here: &str,
    problems: &mut Vec<String>,
) -> Option<IdentityConfig> {
    let before = problems.len();
    let mut name = None;
    let mut issuer = None;
    let mut key = None;
    let mut credential = None;
    let mut lifetime = Lifetime::MAX;
    let mut default = false;
    let mut allow_insecure = false;
    let mut allowed = Allowed::default();
    for (field, value) in fields {
        let where_ = at(field.span());
        match field.get_ref().as_ref() {
            "name" => name = expect_str(value, &where_, "name", problems).map(str::to_owned),
            "issuer" => issuer = expect_str(value, &where_, "issuer", problems).map(str::to_owned),
            "key" => key = expect_str(value, &where_, "key", problems).map(|text| base.join(text)),
            "key_credential" => {
                credential = expect_str(value, &where_, "key_credential", problems)
                    .and_then(|name| credential_path(name, credentials, &where_, problems))
            }
            "lifetime" => {
                if let Some(text) = expect_str(value, &where_, "lifetime", problems) {
                    match parse_lifetime(text) {
                        Ok(parsed) => lifetime = parsed,
                        Err(error) => problems.push(format!("{where_}: `lifetime`: {error}")),
                    }
                }
            }
            "default" => {
                default = expect_bool(value, &where_, "default", problems).unwrap_or(false)
            }
            "allow_insecure_key_permissions" => {
                allow_insecure =
                    expect_bool(value, &where_, "allow_insecure_key_permissions", problems)
                        .unwrap_or(false)
            }
            key @ ("allow_uids" | "allow_gids" | "allow_users" | "allow_groups") => {
                allowed.read(key, value, &where_, problems)
            }
            other => problems.push(format!(
                "{where_}: unknown key `{other}` in [[identity]]; expected one of: {IDENTITY_KEYS}"
            )),
        }
    }
    let name = name.unwrap_or_else(|| DEFAULT_IDENTITY.to_owned());
    if let Err(problem) = check_name(&name) {
        problems.push(format!("{here}: {problem}"));
    }
    match &issuer {
        None => problems.push(format!(
            "{here}: [[identity]] {name:?} has no `issuer`: add issuer = \"you@example.com\", the email your public key is registered with"
        )),
        Some(issuer) => {
            if let Err(problem) = check_issuer(issuer) {
                problems.push(format!("{here}: {problem}"));
            }
        }
    }
    if key.is_some() && credential.is_some() {
        problems.push(format!(
            "{here}: [[identity]] {name:?} sets both `key` and `key_credential`: keep one"
        ));
    }
    let policy = match allowed.policy(euid) {
        Some(policy) => policy,
        None => {
            problems.push(format!(
                "{here}: [[identity]] {name:?} has a policy that admits nobody (allow_uids, allow_gids, allow_users and allow_groups are all empty): add a uid, user or group, or remove them all to admit only the agent's user and root"
            ));
            Policy::owner_and_root(euid)
        }
    };
    let key_is_credential = credential.is_some();
    let key = credential.or(key).unwrap_or_else(|| base.join(KEY_FILE));
    (problems.len() == before).then(|| IdentityConfig {
        name,
        issuer: issuer.unwrap_or_default(),
        key,
        lifetime,
        default,
        allow_insecure_key_permissions: allow_insecure,
        key_is_credential,
        policy,
    })
}

fn check_duplicates(path: &Path, raw: &[RawIdentity], problems: &mut Vec<String>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for identity in raw {
        if let Some(first) = seen.insert(&identity.identity.name, identity.line) {
            problems.push(format!(
                "{}:{}: identity name {:?} is already used at line {first}: give each [[identity]] a unique name",
                path.display(),
                identity.line,
                identity.identity.name
            ));
        }
    }
    let defaults: Vec<String> = raw
        .iter()
        .filter(|identity| identity.identity.default)
        .map(|identity| format!("{:?} (line {})", identity.identity.name, identity.line))
        .collect();
    if defaults.len() > 1 {
        problems.push(format!(
            "{}: several identities say default = true: {}; mark exactly one",
            path.display(),
            defaults.join(", ")
        ));
    } else if defaults.is_empty() && raw.len() > 1 {
        problems.push(format!(
            "{}: {} identities and none says default = true: mark the one an empty request means",
            path.display(),
            raw.len()
        ));
    }
}

/// `--key`, `--issuer` and `--lifetime` change the default identity.
fn apply_overrides(
    overrides: &Overrides,
    identities: &mut [IdentityConfig],
    problems: &mut Vec<String>,
) {
    if let Some(Err(problem)) = overrides.issuer.as_deref().map(check_issuer) {
        problems.push(format!("--issuer: {problem}"));
    }
    let Some(identity) = identities.iter_mut().find(|identity| identity.default) else {
        return;
    };
    if let Some(issuer) = &overrides.issuer {
        identity.issuer = issuer.clone();
    }
    if let Some(key) = &overrides.key {
        identity.key = key.clone();
        identity.key_is_credential = false;
    }
    if let Some(lifetime) = overrides.lifetime {
        identity.lifetime = lifetime;
    }
}

/// With no `[[identity]]` in a file (or no file), the flags define the
/// `default` identity, and `--issuer` is required.
fn add_identity_from_flags(
    overrides: &Overrides,
    context: &Context,
    identities: &mut Vec<IdentityConfig>,
    problems: &mut Vec<String>,
) {
    match &overrides.issuer {
        Some(issuer) => identities.push(IdentityConfig {
            name: DEFAULT_IDENTITY.to_owned(),
            issuer: issuer.clone(),
            key: overrides
                .key
                .clone()
                .unwrap_or_else(|| context.config_dir.join(KEY_FILE)),
            lifetime: overrides.lifetime.unwrap_or(Lifetime::MAX),
            default: true,
            allow_insecure_key_permissions: false,
            key_is_credential: false,
            policy: Policy::owner_and_root(context.euid),
        }),
        None => problems.push(format!(
            "no identity is configured: pass --issuer EMAIL (the email your public key is registered with), or write an [[identity]] in {}",
            overrides
                .config
                .clone()
                .unwrap_or_else(|| context.config_dir.join(CONFIG_FILE))
                .display()
        )),
    }
}

/// Where `serve` binds: `--socket`, `$SKYKIT_AGENT_SOCKET`, `socket` in the
/// file, `$RUNTIME_DIRECTORY/agent.sock`, the system path for root, else
/// `$XDG_RUNTIME_DIR/skykit-agent/agent.sock`.
fn socket_path(
    overrides: &Overrides,
    env: &dyn Env,
    context: &Context,
    in_file: Option<PathBuf>,
    problems: &mut Vec<String>,
) -> Option<PathBuf> {
    if let Some(path) = &overrides.socket {
        return Some(path.clone());
    }
    if let Some(path) = env.non_empty(ENV_SOCKET) {
        return Some(PathBuf::from(path));
    }
    if in_file.is_some() {
        return in_file;
    }
    if let Some(dirs) = env.non_empty(ENV_RUNTIME_DIRECTORY) {
        // systemd separates several runtime directories with colons.
        let first = dirs
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        return Some(Path::new(&first).join(SOCKET_FILE));
    }
    if context.euid == 0 {
        return Some(PathBuf::from(SYSTEM_SOCKET));
    }
    if let Some(dir) = env.non_empty(ENV_XDG_RUNTIME_DIR) {
        return Some(Path::new(&dir).join(USER_SOCKET_DIR).join(SOCKET_FILE));
    }
    problems.push(format!(
        "no socket path: pass --socket PATH, or set {ENV_SOCKET}, `socket` in the config, or {ENV_XDG_RUNTIME_DIR}"
    ));
    None
}

/// The `allow_*` keys of one identity, resolved to uids and gids.
#[derive(Default)]
struct Allowed {
    /// Whether any `allow_*` key was written (even with an empty list).
    present: bool,
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Allowed {
    fn read(
        &mut self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        here: &str,
        problems: &mut Vec<String>,
    ) {
        self.present = true;
        let DeValue::Array(items) = value.get_ref() else {
            problems.push(format!(
                "{here}: `{key}` must be an array, such as {key} = [{}]",
                example(key)
            ));
            return;
        };
        for item in items.iter() {
            match (key, item.get_ref()) {
                ("allow_uids", DeValue::Integer(number)) => match number.as_str().parse::<u32>() {
                    Ok(uid) => self.uids.push(uid),
                    Err(_) => problems.push(format!("{here}: `allow_uids`: {number} is not a uid")),
                },
                ("allow_gids", DeValue::Integer(number)) => match number.as_str().parse::<u32>() {
                    Ok(gid) => self.gids.push(gid),
                    Err(_) => problems.push(format!("{here}: `allow_gids`: {number} is not a gid")),
                },
                ("allow_users", DeValue::String(name)) => match nix::unistd::User::from_name(name) {
                    Ok(Some(user)) => self.uids.push(user.uid.as_raw()),
                    _ => problems.push(format!(
                        "{here}: `allow_users`: {name:?} is not a user on this system: create it or remove it from the list"
                    )),
                },
                ("allow_groups", DeValue::String(name)) => match resolve_group(name) {
                    Ok(group) => self.gids.push(group.gid),
                    Err(_) => problems.push(format!(
                        "{here}: `allow_groups`: {name:?} is not a group on this system: create it (e.g. with systemd-sysusers) or remove it from the list"
                    )),
                },
                (_, other) => problems.push(format!(
                    "{here}: `{key}` holds {}, but expects {}",
                    other.type_str(),
                    if key.ends_with("ids") { "integers" } else { "strings (names)" }
                )),
            }
        }
    }

    /// The policy written, the default one when none was, or `None` when
    /// what was written can never match.
    fn policy(self, euid: u32) -> Option<Policy> {
        if self.present {
            Policy::new(self.uids, self.gids)
        } else {
            Some(Policy::owner_and_root(euid))
        }
    }
}

fn example(key: &str) -> &'static str {
    match key {
        "allow_uids" | "allow_gids" => "1000, 1001",
        "allow_users" => "\"alice\"",
        _ => "\"skykit\"",
    }
}

/// The file of credential `name` that systemd placed in `$CREDENTIALS_DIRECTORY`.
fn credential_path(
    name: &str,
    credentials: Option<&Path>,
    here: &str,
    problems: &mut Vec<String>,
) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        problems.push(format!(
            "{here}: key_credential {name:?} is not a credential name: use the name given to LoadCredential=, such as \"private.pem\""
        ));
        return None;
    }
    match credentials {
        Some(dir) => Some(dir.join(name)),
        None => {
            problems.push(format!(
                "{here}: key_credential {name:?} needs ${ENV_CREDENTIALS_DIRECTORY}, which systemd sets for a service with LoadCredential=; outside systemd, use `key` instead"
            ));
            None
        }
    }
}

/// A socket mode written as octal digits, such as "0660".
fn parse_mode(text: &str) -> Result<u32, String> {
    let valid =
        !text.is_empty() && text.len() <= 4 && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(text, 8) {
        Ok(mode) if valid && mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "socket_mode {text:?} is not a file mode: write octal permission bits as a string, such as \"0660\""
        )),
    }
}

/// A group name (or numeric gid) resolved through the system's group database.
fn resolve_group(name: &str) -> Result<Group, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Group {
            name: name.to_owned(),
            gid,
        });
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(Group {
            name: name.to_owned(),
            gid: group.gid.as_raw(),
        }),
        Ok(None) => Err(format!(
            "socket_group {name:?} is not a group on this system: create it (e.g. with systemd-sysusers) or name an existing one"
        )),
        Err(error) => Err(format!("cannot look up socket_group {name:?}: {error}")),
    }
}

/// A lifetime as written in the config or on the command line.
pub fn parse_lifetime(text: &str) -> Result<Lifetime, String> {
    let parsed = duration::parse(text).map_err(|error| error.to_string())?;
    Lifetime::from_secs(parsed.as_secs() as i64).map_err(|error| error.to_string())
}

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_'
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "identity name {name:?} is not allowed: use 1 to 64 of a-z, 0-9, '-' and '_'"
        ))
    }
}

fn check_issuer(issuer: &str) -> Result<(), String> {
    let looks_like_email = issuer
        .split_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !issuer.chars().any(|c| c.is_whitespace() || c.is_control());
    if looks_like_email {
        Ok(())
    } else {
        Err(format!(
            "issuer {issuer:?} is not an email address: use the email your public key is registered with at Skykit"
        ))
    }
}

fn expect_str<'a>(
    value: &'a Spanned<DeValue<'_>>,
    here: &str,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<&'a str> {
    match value.get_ref() {
        DeValue::String(text) => Some(text.as_ref()),
        other => {
            problems.push(format!(
                "{here}: `{name}` must be a string, not {}",
                other.type_str()
            ));
            None
        }
    }
}

fn expect_bool(
    value: &Spanned<DeValue<'_>>,
    here: &str,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<bool> {
    match value.get_ref() {
        DeValue::Boolean(flag) => Some(*flag),
        other => {
            problems.push(format!(
                "{here}: `{name}` must be true or false, not {}",
                other.type_str()
            ));
            None
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
