//! Prometheus metrics: counters and histograms kept as process-wide atomics
//! (cheap enough for the GetToken hot path), gauges read from the live
//! state at scrape time, and the optional `[metrics] listen` endpoint that
//! serves them as OpenMetrics text at `/metrics`.

use std::{
    convert::Infallible,
    fmt::Write as _,
    sync::{Arc, LazyLock, atomic::AtomicU64},
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    cache::{Clock as _, SystemClock},
    config::MetricsListen,
    memory::Protection,
    server::Service,
    socket::{self, Access},
};

/// A label value that shares the identity's name instead of copying it on
/// every increment.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    pub identity: Name,
    /// `cached` or `fresh`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The gRPC status of the refusal, in snake case.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeasureLabels {
    pub measure: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClassLabels {
    /// `2xx`, `4xx`, ...: the status the proxy answered its client with.
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub path: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    pub tokens_issued: Family<IssuedLabels, Counter>,
    pub signing_seconds: Histogram,
    pub get_token_seconds: Histogram,
    pub refusals: Family<ReasonLabels, Counter>,
    pub refresh_failures: Family<IdentityLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub token_expiry_seconds: Family<IdentityLabels, Gauge<f64, AtomicU64>>,
    pub key_protection: Family<MeasureLabels, Gauge>,
    pub open_connections: Gauge,
    pub watchers: Gauge,
    pub sink_write_failures: Family<SinkLabels, Counter>,
    pub proxy_requests: Family<StatusClassLabels, Counter>,
    pub proxy_request_seconds: Histogram,
    pub proxy_retries: Counter,
    registry: Registry,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("skykit_agent");
        let metrics = Metrics {
            tokens_issued: Family::default(),
            // 100 µs to ~3 s: an RSA signature takes about a millisecond.
            signing_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 10 µs to ~0.3 s: a cache hit takes tens of microseconds.
            get_token_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 16)),
            refusals: Family::default(),
            refresh_failures: Family::default(),
            reloads: Family::default(),
            token_expiry_seconds: Family::default(),
            key_protection: Family::default(),
            open_connections: Gauge::default(),
            watchers: Gauge::default(),
            sink_write_failures: Family::default(),
            proxy_requests: Family::default(),
            // 1 ms to ~30 s: a round trip to Skykit API, up to the timeout.
            proxy_request_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            proxy_retries: Counter::default(),
            registry: Registry::default(),
        };
        // Registered metrics share their values with the fields above.
        let r = &mut registry;
        r.register("tokens_issued", "Tokens handed to callers, by identity and by whether served from the cache or freshly signed", metrics.tokens_issued.clone());
        r.register(
            "signing_seconds",
            "Time to sign one token",
            metrics.signing_seconds.clone(),
        );
        r.register(
            "get_token_seconds",
            "Time to answer one GetToken call",
            metrics.get_token_seconds.clone(),
        );
        r.register(
            "refusals",
            "Refused requests, by reason",
            metrics.refusals.clone(),
        );
        r.register(
            "refresh_failures",
            "Failed signatures, by identity",
            metrics.refresh_failures.clone(),
        );
        r.register(
            "reloads",
            "SIGHUP reloads, by result",
            metrics.reloads.clone(),
        );
        r.register(
            "token_expiry_seconds",
            "Seconds until the soonest-expiring cached token of each identity expires",
            metrics.token_expiry_seconds.clone(),
        );
        r.register("key_protection", "Key memory protection in force: non_dumpable and core_limit_zero (1 or 0), locked_bytes, lock_failures", metrics.key_protection.clone());
        r.register(
            "open_connections",
            "Client connections open now",
            metrics.open_connections.clone(),
        );
        r.register(
            "watchers",
            "Subscribers to token updates now: WatchToken streams, plus one per token file sink",
            metrics.watchers.clone(),
        );
        r.register(
            "sink_write_failures",
            "Failed token file writes, by sink path",
            metrics.sink_write_failures.clone(),
        );
        r.register(
            "proxy_requests",
            "Requests the proxy answered, by the class of the status it answered with",
            metrics.proxy_requests.clone(),
        );
        r.register(
            "proxy_request_seconds",
            "Time from a proxied request to its response headers, retry included",
            metrics.proxy_request_seconds.clone(),
        );
        r.register(
            "proxy_retries",
            "Proxied requests sent again with a new token after the upstream answered 401",
            metrics.proxy_retries.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts a refusal, by the gRPC code it was answered with.
    pub fn refused(&self, code: tonic::Code) {
        let reason = match code {
            tonic::Code::NotFound => "not_found",
            tonic::Code::InvalidArgument => "invalid_argument",
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::ResourceExhausted => "resource_exhausted",
            tonic::Code::Unavailable => "unavailable",
            _ => "other",
        };
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The OpenMetrics text, with gauges read from `service` now.
    pub fn render(&self, service: &Service) -> String {
        self.update_gauges(service);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    fn update_gauges(&self, service: &Service) {
        let now = SystemClock.wall().as_secs_f64();
        self.token_expiry_seconds.clear();
        for entry in service.cache().snapshot() {
            let gauge = self.token_expiry_seconds.get_or_create(&IdentityLabels {
                identity: Name(entry.identity.clone()),
            });
            let left = entry.expires_at as f64 - now;
            let current = gauge.get();
            if current == 0.0 || left < current {
                gauge.set(left);
            }
        }
        let protection = Protection::current();
        for (measure, value) in [
            ("non_dumpable", i64::from(protection.non_dumpable)),
            ("core_limit_zero", i64::from(protection.core_limit_zero)),
            ("locked_bytes", protection.locked_bytes as i64),
            ("lock_failures", protection.lock_failures as i64),
        ] {
            self.key_protection
                .get_or_create(&MeasureLabels { measure })
                .set(value);
        }
        self.open_connections.set(service.open_connections() as i64);
        self.watchers.set(service.cache().watchers() as i64);
    }
}

/// Observes how long `start` took into `histogram`.
pub fn observe_since(histogram: &Histogram, start: std::time::Instant) {
    histogram.observe(start.elapsed().as_secs_f64());
}

/// Serves `/metrics` on `listen` until the task is dropped.
pub async fn serve(listen: MetricsListen, access: Access, service: Service) -> anyhow::Result<()> {
    match listen {
        MetricsListen::Unix(path) => {
            let mut bound = socket::bind(&path, access)?;
            let listener = tokio::net::UnixListener::from_std(
                bound
                    .take_listener()
                    .ok_or_else(|| anyhow::anyhow!("metrics socket already taken"))?,
            )?;
            tracing::info!(listen = %path.display(), "serving metrics");
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => spawn_connection(TokioIo::new(stream), service.clone()),
                    Err(error) => accept_failed(error).await,
                }
            }
        }
        MetricsListen::Tcp(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|error| {
                    anyhow::anyhow!("cannot listen for metrics on {address}: {error}")
                })?;
            tracing::info!(listen = %address, "serving metrics");
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => spawn_connection(TokioIo::new(stream), service.clone()),
                    Err(error) => accept_failed(error).await,
                }
            }
        }
    }
}

async fn accept_failed(error: std::io::Error) {
    tracing::warn!(%error, "metrics: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn_connection<I>(io: I, service: Service)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let handler = service_fn(move |request: Request<hyper::body::Incoming>| {
            let service = service.clone();
            async move { Ok::<_, Infallible>(answer(&request, &service)) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(5))
            .serve_connection(io, handler);
        if let Err(error) = connection.await {
            tracing::debug!(%error, "metrics connection ended");
        }
    });
}

fn answer(request: &Request<hyper::body::Incoming>, service: &Service) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            global().render(service),
        ),
        (&hyper::Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
