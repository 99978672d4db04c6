//! The `serve` lifecycle: take the socket systemd passed or bind one, tell
//! systemd when tokens can be served, reload config and keys on SIGHUP
//! without dropping a request, and stop on SIGTERM or SIGINT.

use std::{fmt, path::PathBuf, sync::Arc, time::SystemTime};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{self, Config, Context, Overrides, Problems, ProcessEnv},
    identity::{self, Identities, Registry},
    memory::Protection,
    server::{self, AgentCache, Service},
    signal::Shutdown,
    sink,
    socket::{self, Access, BoundSocket},
    status::{Reload, Tracker},
    systemd,
};

/// Loads config and keys the same way at start, on reload and for `check`.
#[derive(Debug, Clone)]
pub struct Loader {
    pub overrides: Overrides,
    pub context: Context,
}

/// Why config or keys could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    Config(Problems),
    Keys(Vec<identity::Error>),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Config(problems) => write!(f, "{problems}"),
            LoadError::Keys(errors) => {
                let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
                write!(f, "{}", lines.join("\n"))
            }
        }
    }
}

impl std::error::Error for LoadError {}

impl Loader {
    /// Resolves the config and loads and self-tests every key.
    pub fn load(&self) -> Result<(Config, Identities), LoadError> {
        let config =
            config::load(&self.overrides, &ProcessEnv, &self.context).map_err(LoadError::Config)?;
        let identities = Identities::load(&config).map_err(LoadError::Keys)?;
        Ok((config, identities))
    }
}

/// How `serve` runs beyond what the config says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Benchmarks only: sign for every call instead of using the cache.
    pub sign_every_call: bool,
}

/// Serves until SIGTERM or SIGINT. Returns (rather than exiting) so the
/// keys are dropped and zeroized on the way out.
pub async fn run(
    loader: Loader,
    config: Config,
    identities: Identities,
    options: Options,
) -> anyhow::Result<()> {
    let shutdown = Shutdown::install().context("cannot install signal handlers")?;
    let hangups = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let (listener, bound) = listen(&config)?;
    let socket_path = bound
        .as_ref()
        .map(|bound| bound.path().to_owned())
        .or_else(|| listener.local_addr().ok()?.as_pathname().map(PathBuf::from))
        .unwrap_or_default();
    let listener =
        tokio::net::UnixListener::from_std(listener).context("cannot register the socket")?;
    let tracker = Arc::new(Tracker::new(socket_path.clone()));
    let registry = Arc::new(Registry::new(identities));
    let mut service = Service::new(registry.clone(), tracker.clone(), config.limits);
    if options.sign_every_call {
        tracing::warn!("benchmark mode: signing for every call, bypassing the cache");
        service = service.signing_every_call();
    }
    // Bound before READY=1: a configured proxy that cannot listen stops
    // the start (before any sink writes), like the agent's own socket.
    let proxy = match &config.proxy {
        Some(proxy) => Some(
            crate::proxy::bind(proxy, socket_access(&config))
                .context("cannot start the proxy ([proxy] in the config)")?,
        ),
        None => None,
    };
    // The sinks write on their own tasks, so they may start before READY=1:
    // a sink that cannot be written is logged and retried, never fatal.
    let sinks = sink::start(
        &config.sinks,
        &registry.current(),
        service.cache(),
        &tracker,
    );
    let protection = Protection::current();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        socket = %socket_path.display(),
        activated = bound.is_none(),
        identities = %describe(&registry.current()),
        key_protection = %protection,
        "skykit-agent ready"
    );
    if protection.lock_failures > 0 {
        tracing::warn!(
            "key memory could not be locked in RAM, so keys may reach swap: raise the locked-memory limit (LimitMEMLOCK= in the unit, `ulimit -l` in a shell), or set require_locked_memory = true to refuse to start instead"
        );
    }
    systemd::ready(&serving_status(&registry.current(), &socket_path));
    let watchdog = tokio::spawn(systemd::watchdog());
    let metrics = config.metrics.clone().map(|listen| {
        let access = Access {
            mode: config.socket_mode,
            group: config.socket_group.as_ref().map(|group| group.gid),
        };
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(error) = crate::metrics::serve(listen, access, service).await {
                tracing::error!(error = %format!("{error:#}"), "the metrics listener failed; tokens are still served");
            }
        })
    });
    let proxy = proxy.map(|proxy| tokio::spawn(proxy.run(service.clone(), registry.clone())));
    let reloader = tokio::spawn(reload_on_hangup(
        hangups,
        loader,
        config,
        Reloadable {
            registry,
            cache: service.cache().clone(),
            tracker,
        },
    ));
    let socket_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = async {
        tokio::select! {
            () = shutdown.wait() => {}
            () = watch_socket_file(bound.as_ref(), &socket_lost) => {}
        }
        systemd::stopping();
    };
    let stopper = service.clone();
    let result = server::run(listener, service, stop).await;
    stopper.begin_stopping();
    sinks.stop();
    reloader.abort();
    watchdog.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Some(mut proxy) = proxy {
        // The proxy drains its requests in flight within the drain timeout,
        // alongside the agent socket's; the margin only covers a proxy that
        // fails to, and ending its task removes its socket file.
        let margin = stopper.limits().drain_timeout + std::time::Duration::from_secs(1);
        if tokio::time::timeout(margin, &mut proxy).await.is_err() {
            proxy.abort();
            let _ = proxy.await;
        }
    }
    drop(bound);
    result?;
    if socket_lost.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!(
            "the socket file {} was deleted or replaced while the agent ran, so clients could no longer reach it; exiting so the service manager restarts the agent with a new socket",
            socket_path.display()
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often the agent checks that its socket file is still in place.
const SOCKET_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Resolves when the socket file the agent bound is deleted or replaced
/// (e.g. by a careless cleanup of /run). Clients cannot reach an unlinked
/// socket, so the agent stops and exits non-zero: under systemd,
/// `Restart=on-failure` brings it back on a fresh socket. A socket systemd
/// passed in is systemd's to manage, so it is not watched.
async fn watch_socket_file(bound: Option<&BoundSocket>, lost: &std::sync::atomic::AtomicBool) {
    let Some(bound) = bound else {
        return std::future::pending().await;
    };
    let mut ticks = tokio::time::interval(SOCKET_CHECK_INTERVAL);
    loop {
        ticks.tick().await;
        if !bound.is_intact() {
            tracing::error!(
                socket = %bound.path().display(),
                "the socket file was deleted or replaced; stopping so the agent can be restarted on a new socket"
            );
            lost.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
    }
}

/// The socket systemd passed, or one bound at the configured path.
fn listen(
    config: &Config,
) -> anyhow::Result<(std::os::unix::net::UnixListener, Option<BoundSocket>)> {
    if let Some(listener) =
        systemd::activated_listener().context("cannot use the socket systemd passed")?
    {
        // systemd owns that socket file: the agent never removes it.
        return Ok((listener, None));
    }
    let access = Access {
        mode: config.socket_mode,
        group: config.socket_group.as_ref().map(|group| group.gid),
    };
    let mut bound = socket::bind(&config.socket, access)?;
    let listener = bound
        .take_listener()
        .context("the socket was already handed out")?;
    Ok((listener, Some(bound)))
}

/// Who may connect to a socket the agent binds itself: the agent's socket,
/// and the proxy's when it listens on one.
fn socket_access(config: &Config) -> Access {
    Access {
        mode: config.socket_mode,
        group: config.socket_group.as_ref().map(|group| group.gid),
    }
}

/// What a reload replaces.
struct Reloadable {
    registry: Arc<Registry>,
    cache: AgentCache,
    tracker: Arc<Tracker>,
}

async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    loader: Loader,
    mut config: Config,
    live: Reloadable,
) {
    while hangups.recv().await.is_some() {
        systemd::reloading();
        tracing::info!("SIGHUP: reloading config and keys");
        let outcome = reload(&loader, &mut config, &live).await;
        let error = outcome.as_ref().err().map(ToString::to_string);
        crate::metrics::global()
            .reloads
            .get_or_create(&crate::metrics::ResultLabels {
                result: if error.is_none() { "ok" } else { "failed" },
            })
            .inc();
        live.tracker.record_reload(Reload {
            finished_at: SystemTime::now(),
            error: error.clone(),
        });
        let socket = live.tracker.socket.clone();
        match error {
            None => systemd::ready(&serving_status(&live.registry.current(), &socket)),
            Some(error) => {
                tracing::error!(%error, "reload failed; still serving the previous config and keys");
                systemd::ready(&format!(
                    "reload failed, serving the previous config: {}",
                    error.lines().next().unwrap_or_default()
                ));
            }
        }
    }
}

/// Loads everything first, off the reactor; then swaps it in at once.
/// Calls in flight finish with the identities they started with.
async fn reload(loader: &Loader, current: &mut Config, live: &Reloadable) -> Result<(), LoadError> {
    let loader = loader.clone();
    let (config, identities) = tokio::task::spawn_blocking(move || loader.load())
        .await
        .unwrap_or_else(|_| Err(LoadError::Keys(Vec::new())))?;
    warn_about_unreloadable(current, &config);
    let old = live.registry.current();
    let removed: Vec<Arc<str>> = old
        .iter()
        .filter(|before| identities.resolve(&before.name).is_none())
        .map(|identity| identity.name.clone())
        .collect();
    let changed: Vec<Arc<str>> = old
        .iter()
        .filter(|before| {
            identities.resolve(&before.name).is_some_and(|after| {
                after.key.key_id() != before.key.key_id() || after.issuer != before.issuer
            })
        })
        .map(|identity| identity.name.clone())
        .collect();
    live.registry.replace(identities);
    // Tokens of a changed key or issuer must not be served any more; those
    // of a removed identity go with it (and its watch streams end).
    for name in &changed {
        live.cache.forget(name);
    }
    for name in &removed {
        live.cache.remove(name);
    }
    tracing::info!(
        identities = %describe(&live.registry.current()),
        dropped_from_cache = ?changed,
        removed = ?removed,
        "reloaded"
    );
    *current = config;
    Ok(())
}

/// Settings a reload cannot apply: the listeners', and the sinks, whose
/// tasks run from start to stop (a rotated key still reaches the sink
/// files, since the cache re-signs their entries at once).
fn warn_about_unreloadable(before: &Config, after: &Config) {
    let settings = [
        ("socket", before.socket != after.socket),
        ("socket_mode", before.socket_mode != after.socket_mode),
        ("socket_group", before.socket_group != after.socket_group),
        ("limits", before.limits != after.limits),
        ("metrics", before.metrics != after.metrics),
        ("proxy", before.proxy != after.proxy),
        ("sink", before.sinks != after.sinks),
    ];
    for (setting, changed) in settings {
        if changed {
            tracing::warn!(
                setting,
                "this setting changed, but reload does not apply it: restart the agent to apply it"
            );
        }
    }
}

fn describe(identities: &Identities) -> String {
    let parts: Vec<String> = identities
        .iter()
        .map(|identity| {
            format!(
                "{} (iss {}, key_id {})",
                identity.name,
                identity.issuer,
                identity.key.key_id()
            )
        })
        .collect();
    parts.join(", ")
}

fn serving_status(identities: &Identities, socket: &std::path::Path) -> String {
    format!(
        "serving {} on {}",
        identities.names().join(", "),
        socket.display()
    )
}
