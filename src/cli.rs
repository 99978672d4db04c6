//! The command line: `serve`, `token`, `keygen` and `pubkey`, one function
//! each, and the exit codes they share.

use std::{
    io::{self, IsTerminal, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::{
    client,
    config::{self, Config, Context, Overrides, ProcessEnv},
    daemon::{self, Loader},
    duration,
    key::{self, Bits, LoadOptions, SigningKey},
    memory,
    proto::{
        GetStatusRequest, GetStatusResponse, GetTokenRequest, ListIdentitiesRequest,
        agent_service_client::AgentServiceClient,
    },
    server,
    token::Lifetime,
};

const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   runtime failure
  2   usage error (bad flags)
  3   the agent is unreachable
  4   the agent refused the request (unknown identity, invalid argument, permission denied)
  5   status: the agent is reachable but not serving, its last reload failed, or a
      token file sink is failing
  78  serve or check rejected the configuration or a key";

/// The exit codes, documented in every `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Failure = 1,
    Usage = 2,
    Unreachable = 3,
    Refused = 4,
    Unhealthy = 5,
    Config = 78,
}

/// An error and the exit code it ends the process with.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl Failure {
    fn new(exit: Exit, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            exit,
            error: error.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::new(Exit::Failure, error)
    }
}

/// Issues Skykit API access tokens to local processes, so none of them reads the private key.
#[derive(Debug, Parser)]
#[command(name = "skykit-agent", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground: load the keys, then serve tokens on the Unix socket.
    #[command(after_help = EXIT_CODES)]
    Serve(ServeArgs),
    /// Print a token from the running agent (for `Authorization: Bearer $(skykit-agent token)`).
    #[command(after_help = EXIT_CODES)]
    Token(TokenArgs),
    /// Create a new RSA key pair (private.pem, public.pem) to register with Skykit.
    #[command(after_help = EXIT_CODES)]
    Keygen(KeygenArgs),
    /// Print the public key and key_id of an existing private key.
    #[command(after_help = EXIT_CODES)]
    Pubkey(PubkeyArgs),
    /// Load the config and keys exactly as `serve` would, without serving; exit 0 or 78.
    #[command(after_help = EXIT_CODES)]
    Check(CheckArgs),
    /// Show the running agent's state: identities, cache, last reload, connections, sinks.
    #[command(after_help = EXIT_CODES)]
    Status(StatusArgs),
    /// List the identities the agent lets you use, with issuer, key_id and default lifetime.
    #[command(after_help = EXIT_CODES)]
    Identities(StatusArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Config file [default: as for serve]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// As for serve
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// As for serve
    #[arg(long, value_name = "EMAIL")]
    pub issuer: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's socket [default: discovered as for `token`]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file [default: $SKYKIT_AGENT_CONFIG, else config.toml in the config dir
    /// (/etc/skykit-agent for root, ~/.config/skykit-agent otherwise)]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Socket to listen on [default: $SKYKIT_AGENT_SOCKET, `socket` in the config,
    /// $RUNTIME_DIRECTORY/agent.sock, /run/skykit-agent/agent.sock for root,
    /// else $XDG_RUNTIME_DIR/skykit-agent/agent.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Private key of the default identity (PEM, PKCS#8 or PKCS#1) [default: private.pem in the config dir]
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Email the public key is registered with; the tokens' `iss` (of the default identity)
    #[arg(long, value_name = "EMAIL")]
    pub issuer: Option<String>,
    /// Default token lifetime of the default identity, 60s to 1h [default: 1h]
    #[arg(long, value_name = "D", value_parser = config::parse_lifetime)]
    pub lifetime: Option<Lifetime>,
    /// Create the key (and public.pem beside it) when the key file does not exist
    #[arg(long)]
    pub generate_key_if_missing: bool,
    /// Log level [default: $RUST_LOG, else info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,
    /// Benchmarks only: sign a new token for every call, bypassing the cache
    #[arg(long, hide = true)]
    pub bench_sign_every_call: bool,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The agent's socket [default: $SKYKIT_AGENT_SOCKET, else the first existing of
    /// $XDG_RUNTIME_DIR/skykit-agent/agent.sock and /run/skykit-agent/agent.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Identity to sign for [default: the agent's default identity]
    #[arg(long, value_name = "NAME")]
    pub identity: Option<String>,
    /// Token lifetime, 60s to 1h [default: the identity's]
    #[arg(long, value_name = "D", value_parser = duration::parse)]
    pub lifetime: Option<Duration>,
    /// Least time the token must stay valid; a cached token that expires sooner is replaced
    #[arg(long, value_name = "D", value_parser = duration::parse)]
    pub min_valid_for: Option<Duration>,
    /// Print the whole response as JSON (the proto3 JSON mapping, as grpcurl prints it)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Folder for private.pem and public.pem [default: the config dir]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// RSA modulus size
    #[arg(long, value_enum, default_value = "2048")]
    pub bits: Bits,
}

#[derive(Debug, Args)]
pub struct PubkeyArgs {
    /// Private key file [default: the config's identity's key, else private.pem in the config dir]
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "identity"])]
    pub key: Option<PathBuf>,
    /// Config file whose identity's key to read
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Identity in the config [default: the default identity]
    #[arg(long, value_name = "NAME")]
    pub identity: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// Logs go to stderr; `--log-level` wins over `RUST_LOG`. Only `serve`
/// logs at info by default: the other commands print for people instead.
pub fn init_tracing(cli: &Cli) {
    let (explicit, fallback) = match &cli.command {
        Command::Serve(args) => (args.log_level, "info"),
        _ => (None, "warn"),
    };
    let filter = match explicit {
        Some(level) => EnvFilter::new(format!("{level:?}").to_lowercase()),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(fallback)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Token(args) => token(args),
        Command::Keygen(args) => keygen(args),
        Command::Pubkey(args) => pubkey(args),
        Command::Check(args) => check(args),
        Command::Status(args) => status(args),
        Command::Identities(args) => identities(args),
    }
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    // Before any key is read: no core dumps, no same-uid ptrace.
    memory::harden_process();
    let loader = Loader {
        overrides: Overrides {
            config: args.config,
            socket: args.socket,
            key: args.key,
            issuer: args.issuer,
            lifetime: args.lifetime,
        },
        context: Context::current(),
    };
    if args.generate_key_if_missing {
        let config = config::load(&loader.overrides, &ProcessEnv, &loader.context)
            .map_err(|problems| Failure::new(Exit::Config, problems))?;
        generate_missing_keys(&config)?;
    }
    let (config, identities) = loader
        .load()
        .map_err(|error| Failure::new(Exit::Config, error))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let options = daemon::Options {
        sign_every_call: args.bench_sign_every_call,
    };
    runtime.block_on(daemon::run(loader, config, identities, options))?;
    Ok(())
}

fn check(args: CheckArgs) -> Result<(), Failure> {
    memory::harden_process();
    let loader = Loader {
        overrides: Overrides {
            config: args.config,
            key: args.key,
            issuer: args.issuer,
            ..Overrides::default()
        },
        context: Context::current(),
    };
    let (config, identities) = loader
        .load()
        .map_err(|error| Failure::new(Exit::Config, error))?;
    let mut lines = vec![format!(
        "config ok: {}",
        config
            .file
            .as_ref()
            .map_or("no config file (flags only)".to_owned(), |file| file
                .display()
                .to_string())
    )];
    lines.push(format!("socket: {}", config.socket.display()));
    for identity in identities.iter() {
        lines.push(format!(
            "identity {}: iss {}, key_id {}, {}-bit key, default lifetime {}, admits {}",
            identity.name,
            identity.issuer,
            identity.key.key_id(),
            identity.key.bits(),
            duration::format(identity.lifetime.duration()),
            identity.policy.describe()
        ));
    }
    lines.extend(config.sinks.iter().map(describe_sink));
    lines.push(format!(
        "metrics: {}",
        config
            .metrics
            .as_ref()
            .map_or("off".to_owned(), describe_metrics)
    ));
    lines.push(format!(
        "proxy: {}",
        config
            .proxy
            .as_ref()
            .map_or("off".to_owned(), describe_proxy)
    ));
    lines.push(format!("key protection: {}", memory::Protection::current()));
    print_line(&lines.join("\n"))
}

/// `check`'s line for one `[[sink]]`.
fn describe_sink(sink: &crate::config::SinkConfig) -> String {
    let lifetime = sink
        .lifetime
        .map_or("the identity's default lifetime".to_owned(), |lifetime| {
            format!("lifetime {}", duration::format(lifetime.duration()))
        });
    let format = match sink.format {
        crate::config::SinkFormat::Token => "token",
        crate::config::SinkFormat::Json => "json",
    };
    format!(
        "sink {}: {}, {lifetime}, format {format}, mode {:04o}",
        sink.path.display(),
        named_identity(&sink.identity),
        sink.mode
    )
}

/// "identity NAME", or "the default identity" for an empty name.
fn named_identity(name: &str) -> String {
    if name.is_empty() {
        "the default identity".to_owned()
    } else {
        format!("identity {name}")
    }
}

fn describe_metrics(listen: &crate::config::MetricsListen) -> String {
    match listen {
        crate::config::MetricsListen::Unix(path) => format!("unix:{}", path.display()),
        crate::config::MetricsListen::Tcp(address) => address.to_string(),
    }
}

/// `check`'s line for `[proxy]`: where it listens, where it forwards, and
/// whose token it attaches.
fn describe_proxy(proxy: &crate::config::ProxyConfig) -> String {
    let listen = match &proxy.listen {
        crate::config::ProxyListen::Unix(path) => format!("unix:{}", path.display()),
        crate::config::ProxyListen::Tcp(address) => {
            format!("{address} (TCP: any local user)")
        }
    };
    format!(
        "{listen} -> {} with {}'s token, timeout {}",
        proxy.upstream,
        named_identity(&proxy.identity),
        duration::format(proxy.timeout)
    )
}

fn status(args: StatusArgs) -> Result<(), Failure> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (report, serving) = runtime.block_on(async {
        let channel = client::connect_channel(args.socket.as_deref(), &ProcessEnv)
            .await
            .map_err(|unreachable| Failure::new(Exit::Unreachable, unreachable))?;
        let report = AgentServiceClient::new(channel.clone())
            .get_status(GetStatusRequest {})
            .await
            .map_err(status_failure)?
            .into_inner();
        let serving = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|response| response.into_inner().status == ServingStatus::Serving as i32)
            .unwrap_or(false);
        Ok::<_, Failure>((report, serving))
    })?;
    print_line(&format_status(&report, serving))?;
    let reload_failed = report.last_reload.as_ref().is_some_and(|reload| !reload.ok);
    let failing_sinks: Vec<&str> = report
        .sinks
        .iter()
        .filter(|sink| !sink.error.is_empty())
        .map(|sink| sink.path.as_str())
        .collect();
    let problem = if !serving {
        "the agent is not serving".to_owned()
    } else if reload_failed {
        "the last reload failed".to_owned()
    } else if !failing_sinks.is_empty() {
        format!(
            "token file sink failing: {} (the agent retries; see its log)",
            failing_sinks.join(", ")
        )
    } else {
        return Ok(());
    };
    Err(Failure::new(Exit::Unhealthy, anyhow!(problem)))
}

fn identities(args: StatusArgs) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listed = runtime.block_on(async {
        let mut client = client::connect(args.socket.as_deref(), &ProcessEnv)
            .await
            .map_err(|unreachable| Failure::new(Exit::Unreachable, unreachable))?;
        client
            .list_identities(ListIdentitiesRequest {})
            .await
            .map(|response| response.into_inner().identities)
            .map_err(status_failure)
    })?;
    if listed.is_empty() {
        return Err(Failure::new(
            Exit::Refused,
            anyhow!(
                "the agent has no identity you may use: ask its operator to admit your uid or a group of yours"
            ),
        ));
    }
    let lines: Vec<String> = listed
        .iter()
        .map(|identity| {
            format!(
                "{}{}: iss {}, key_id {}, default lifetime {}s",
                identity.name,
                if identity.default { " (default)" } else { "" },
                identity.issuer,
                identity.key_id,
                identity.default_lifetime.as_ref().map_or(0, |d| d.seconds)
            )
        })
        .collect();
    print_line(&lines.join("\n"))
}

fn format_status(report: &GetStatusResponse, serving: bool) -> String {
    let time = |ts: &Option<prost_types::Timestamp>| {
        ts.as_ref().map_or("-".to_owned(), ToString::to_string)
    };
    let mut lines = vec![
        format!("skykit-agent {} on {}", report.version, report.socket),
        format!("serving: {}", if serving { "yes" } else { "no" }),
        format!("started: {}", time(&report.started_at)),
        "identities:".to_owned(),
    ];
    for identity in &report.identities {
        lines.push(format!(
            "  {}{}: iss {}, key_id {}, default lifetime {}s",
            identity.name,
            if identity.default { " (default)" } else { "" },
            identity.issuer,
            identity.key_id,
            identity.default_lifetime.as_ref().map_or(0, |d| d.seconds)
        ));
    }
    lines.push(format!("cache: {} entries", report.cache_entries.len()));
    for entry in &report.cache_entries {
        lines.push(format!(
            "  {} {}s: expires {}, refresh after {}",
            entry.identity,
            entry.lifetime.as_ref().map_or(0, |d| d.seconds),
            time(&entry.expires_at),
            time(&entry.refresh_after)
        ));
    }
    lines.push(match &report.last_reload {
        None => "last reload: never".to_owned(),
        Some(reload) if reload.ok => format!("last reload: {} ok", time(&reload.finished_at)),
        Some(reload) => format!(
            "last reload: {} FAILED: {}",
            time(&reload.finished_at),
            reload.error
        ),
    });
    lines.push(format!("open connections: {}", report.open_connections));
    lines.push(format!("calls in progress: {}", report.calls_in_progress));
    lines.push(format!(
        "watchers: {} (refresher tasks: {})",
        report.watchers, report.refreshers
    ));
    lines.push(match &report.key_protection {
        None => "key protection: unknown".to_owned(),
        Some(protection) => format!(
            "key protection: {} (non-dumpable: {}, core limit 0: {}, locked key bytes: {}, lock failures: {})",
            protection.state,
            protection.non_dumpable,
            protection.core_limit_zero,
            protection.locked_bytes,
            protection.lock_failures
        ),
    });
    lines.push(format!("sinks: {}", report.sinks.len()));
    for sink in &report.sinks {
        let written = sink
            .last_written
            .as_ref()
            .map_or("never written".to_owned(), |at| format!("written {at}"));
        lines.push(if sink.error.is_empty() {
            format!("  {} ({}): ok, {written}", sink.path, sink.identity)
        } else {
            format!(
                "  {} ({}): FAILING ({} failed attempts, {written}): {}",
                sink.path, sink.identity, sink.failures, sink.error
            )
        });
    }
    lines.join("\n")
}

fn generate_missing_keys(config: &Config) -> Result<(), Failure> {
    for identity in &config.identities {
        if identity.key.exists() {
            continue;
        }
        let dir = identity.key.parent().unwrap_or(Path::new("."));
        key::create_private_dir(dir)
            .with_context(|| format!("cannot create key folder {}", dir.display()))?;
        let key = SigningKey::generate(Bits::Rsa2048)?;
        key.write_private_pem(&identity.key)
            .with_context(|| format!("cannot write {}", identity.key.display()))?;
        let public = dir.join("public.pem");
        let public_written =
            !public.exists() && std::fs::write(&public, key.public_key_pem()).is_ok();
        let mut out = io::stdout().lock();
        let _ = writeln!(
            out,
            "Created a new key for identity {:?}: {}{}\n\n{}key_id: {}\n\n{}",
            identity.name,
            identity.key.display(),
            if public_written {
                format!(" (public key: {})", public.display())
            } else {
                String::new()
            },
            key.public_key_pem(),
            key.key_id(),
            register_hint(&identity.issuer),
        );
    }
    Ok(())
}

fn register_hint(issuer: &str) -> String {
    format!(
        "Next: email the public key above to Skykit Support (support@skykit.com) and ask them to register it for {issuer}.\nTokens are accepted by Skykit API once it is registered."
    )
}

fn token(args: TokenArgs) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let response = runtime.block_on(async {
        let mut client = client::connect(args.socket.as_deref(), &ProcessEnv)
            .await
            .map_err(|unreachable| Failure::new(Exit::Unreachable, unreachable))?;
        let request = GetTokenRequest {
            identity: args.identity.unwrap_or_default(),
            lifetime: args.lifetime.map(proto_duration),
            min_valid_for: args.min_valid_for.map(proto_duration),
        };
        client
            .get_token(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(status_failure)
    })?;
    let output = if args.json {
        server::json(&response)
    } else {
        response.token
    };
    print_line(&output)
}

fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: 0,
    }
}

fn status_failure(status: tonic::Status) -> Failure {
    use tonic::Code;
    let exit = match status.code() {
        Code::NotFound
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::ResourceExhausted => Exit::Refused,
        _ => Exit::Failure,
    };
    Failure::new(
        exit,
        anyhow!(
            "the agent answered {:?}: {}",
            status.code(),
            status.message()
        ),
    )
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn print_line(text: &str) -> Result<(), Failure> {
    match writeln!(io::stdout().lock(), "{text}") {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

fn keygen(args: KeygenArgs) -> Result<(), Failure> {
    let dir = args.out.unwrap_or_else(|| Context::current().config_dir);
    let private = dir.join(config::KEY_FILE);
    let public = dir.join("public.pem");
    for path in [&private, &public] {
        if path.exists() {
            return Err(Failure::new(
                Exit::Failure,
                anyhow!(
                    "{} already exists; keygen never overwrites a key: choose another folder with --out, or move the old files away first",
                    path.display()
                ),
            ));
        }
    }
    key::create_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = SigningKey::generate(args.bits)?;
    key.write_private_pem(&private)
        .with_context(|| format!("cannot write {}", private.display()))?;
    std::fs::write(&public, key.public_key_pem())
        .with_context(|| format!("cannot write {}", public.display()))?;
    print_line(&format!(
        "Wrote {} (mode 0600: keep it secret) and {}.\n\n{}key_id: {}\n\n{}\nThen run: skykit-agent serve --issuer YOUR_EMAIL --key {}",
        private.display(),
        public.display(),
        key.public_key_pem(),
        key.key_id(),
        register_hint("the email you use with Skykit"),
        private.display()
    ))
}

fn pubkey(args: PubkeyArgs) -> Result<(), Failure> {
    memory::harden_process();
    let context = Context::current();
    let (path, options) = match args.key {
        Some(path) => (path, LoadOptions::default()),
        None => pubkey_config_key(args.config, args.identity.as_deref(), &context)?,
    };
    let key =
        SigningKey::load(&path, options).map_err(|error| Failure::new(Exit::Failure, error))?;
    print_line(&format!("{}key_id: {}", key.public_key_pem(), key.key_id()))
}

/// The key of an identity in the config; the config dir's private.pem when
/// there is no config file at all.
fn pubkey_config_key(
    config_file: Option<PathBuf>,
    identity: Option<&str>,
    context: &Context,
) -> Result<(PathBuf, LoadOptions), Failure> {
    let explicit = config_file.is_some() || std::env::var_os(config::ENV_CONFIG).is_some();
    if !explicit && !context.config_dir.join(config::CONFIG_FILE).exists() {
        if let Some(name) = identity {
            return Err(Failure::new(
                Exit::Failure,
                anyhow!("--identity {name:?} needs a config file: pass --config FILE"),
            ));
        }
        return Ok((
            context.config_dir.join(config::KEY_FILE),
            LoadOptions::default(),
        ));
    }
    // Only identities matter here, so any socket will do.
    let overrides = Overrides {
        config: config_file,
        socket: Some(PathBuf::from(config::SYSTEM_SOCKET)),
        ..Overrides::default()
    };
    let config = config::load(&overrides, &ProcessEnv, context)
        .map_err(|problems| Failure::new(Exit::Config, problems))?;
    let chosen = match identity {
        None => config.default_identity(),
        Some(name) => config
            .identities
            .iter()
            .find(|candidate| candidate.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = config.identities.iter().map(|i| i.name.as_str()).collect();
                Failure::new(
                    Exit::Failure,
                    anyhow!(
                        "no identity {name:?} in the config; it has: {}",
                        names.join(", ")
                    ),
                )
            })?,
    };
    Ok((
        chosen.key.clone(),
        LoadOptions {
            allow_insecure_permissions: chosen.allow_insecure_key_permissions,
            require_locked_memory: false,
        },
    ))
}
