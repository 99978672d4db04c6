//! The Prometheus endpoint (`[metrics] listen`) end to end with the real
//! binary: after known traffic each counter moved by exactly what it
//! should (tokens by cached/fresh, refusals by reason, reloads by result,
//! signing and GetToken latency), the gauges read the live state
//! (watchers, connections, seconds to expiry, key protection as `status`
//! reports it), every metric is declared with its type, and the text is
//! OpenMetrics ending in `# EOF`. Served on a Unix socket and on a
//! loopback TCP port; only `GET /metrics` is answered.
//!
//! The samples are read by a small parser here; that the text parses with
//! Prometheus' own parsers is checked by `tests/metrics/` (pytest, with
//! the Python `prometheus_client`).

use std::{
    collections::BTreeMap,
    fmt,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use rustix::process::Signal;
use skykit_agent::proto::GetStatusResponse;
use tonic::Code;

use crate::{
    support::*,
    watch::{Client, eventually, runtime, serve_config, write_config},
};

/// The OpenMetrics content type the endpoint answers with.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

// ---------------------------------------------------------------------------
// Helpers: HTTP, the exposition, expectations.
// ---------------------------------------------------------------------------

/// An HTTP response, body as text.
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` on `stream` and
/// reads the whole response (the body must come with a Content-Length).
fn http(mut stream: impl Read + Write, method: &str, path: &str) -> HttpResponse {
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("send the HTTP request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .expect("read the HTTP response");
    let raw = String::from_utf8(raw).expect("the HTTP response is UTF-8");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of the HTTP header in:\n{raw}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("not a header line: {line:?}"));
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let response = HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    };
    let length: usize = response
        .header("content-length")
        .unwrap_or_else(|| panic!("no Content-Length in {:?}", response.headers))
        .parse()
        .expect("Content-Length is a number");
    assert_eq!(
        length,
        response.body.len(),
        "the body is not as long as Content-Length says"
    );
    response
}

/// One request to the metrics endpoint on a Unix socket.
fn http_unix(socket: &Path, method: &str, path: &str) -> HttpResponse {
    let stream = UnixStream::connect(socket)
        .unwrap_or_else(|error| panic!("connect to {}: {error}", socket.display()));
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
    http(stream, method, path)
}

/// One request to the metrics endpoint on a TCP port.
fn http_tcp(port: u16, method: &str, path: &str) -> HttpResponse {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|error| panic!("connect to 127.0.0.1:{port}: {error}"));
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
    http(stream, method, path)
}

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scraped exposition: its text, samples and declared types.
#[derive(Debug)]
struct Exposition {
    text: String,
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// Checks the response is a 200 with OpenMetrics text ending in
    /// `# EOF`, and reads its samples.
    fn of(response: HttpResponse) -> Exposition {
        assert_eq!(
            response.status, 200,
            "GET /metrics answered {}:\n{}",
            response.status, response.body
        );
        assert_eq!(response.header("content-type"), Some(CONTENT_TYPE));
        let text = response.body;
        assert!(
            text.ends_with("\n# EOF\n"),
            "OpenMetrics text ends with `# EOF`:\n{text}"
        );
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                let (name, kind) = declared
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("a TYPE line without a type: {line:?}"));
                types.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') {
                samples.push(parse_sample(line));
            }
        }
        Exposition {
            text,
            samples,
            types,
        }
    }

    /// The value of the series `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|sample| sample.name == name && sample.labels == labels)
            .map(|sample| sample.value)
    }

    /// Every series of `name`, whatever its labels.
    fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|sample| sample.name == name)
            .collect()
    }
}

/// Parses `name{k="v",...} value` (label values may hold escaped quotes).
fn parse_sample(line: &str) -> Sample {
    fn bad<T>(line: &str) -> T {
        panic!("not a sample line: {line:?}")
    }
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad(line));
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut inside) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inside.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inside.split_once("=\"").unwrap_or_else(|| bad(line));
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, escaped)) => value.push(escaped),
                        None => bad(line),
                    },
                    Some((at, '"')) => break at,
                    Some((_, c)) => value.push(c),
                    None => bad(line),
                }
            };
            labels.insert(key.to_owned(), value);
            inside = &after[end + 1..];
            inside = inside.strip_prefix(',').unwrap_or(inside);
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| bad(line));
    Sample {
        name,
        labels,
        value,
    }
}

/// What a series must show.
#[derive(Debug, Clone, Copy)]
enum Want {
    Is(f64),
    /// Within the closed range.
    Between(f64, f64),
    /// No such series.
    Absent,
}

impl Want {
    fn holds(self, actual: Option<f64>) -> bool {
        match (self, actual) {
            (Want::Is(want), Some(actual)) => actual == want,
            (Want::Between(low, high), Some(actual)) => (low..=high).contains(&actual),
            (Want::Absent, None) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Want::Is(value) => write!(f, "{value}"),
            Want::Between(low, high) => write!(f, "in [{low}, {high}]"),
            Want::Absent => write!(f, "absent"),
        }
    }
}

/// `name{k="v",...}` as the exposition writes it.
fn series_name(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let labels: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{key}=\"{value}\""))
        .collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// One expectation: a sample's name, its labels, and what it must be.
type Expectation<'a> = (&'a str, &'a [(&'a str, &'a str)], Want);

/// Checks every `(name, labels, want)`, showing all of them, expected and
/// actual, as blocks (with the whole exposition) when any does not hold.
fn check(exposition: &Exposition, wants: &[Expectation<'_>]) {
    let mut expected = String::new();
    let mut actual = String::new();
    for &(name, labels, want) in wants {
        let series = series_name(name, labels);
        let value = exposition.value(name, labels);
        expected.push_str(&format!("{series} {want}\n"));
        let seen = match value {
            _ if want.holds(value) => want.to_string(),
            Some(value) => value.to_string(),
            None => "absent".to_owned(),
        };
        actual.push_str(&format!("{series} {seen}\n"));
    }
    if expected != actual {
        panic!(
            "the metrics differ\n--- expected ---\n{expected}--- actual ---\n{actual}--- exposition ---\n{}",
            exposition.text
        );
    }
}

/// Every metric the agent exports, with its OpenMetrics type. A family
/// with labels is declared once it has a series: `refresh_failures` after
/// a signature failed, `sink_write_failures` after a sink write failed,
/// `refusals` and `reloads` after the first of each.
const FAMILIES: &[(&str, &str)] = &[
    ("skykit_agent_tokens_issued", "counter"),
    ("skykit_agent_signing_seconds", "histogram"),
    ("skykit_agent_get_token_seconds", "histogram"),
    ("skykit_agent_refusals", "counter"),
    ("skykit_agent_refresh_failures", "counter"),
    ("skykit_agent_reloads", "counter"),
    ("skykit_agent_token_expiry_seconds", "gauge"),
    ("skykit_agent_key_protection", "gauge"),
    ("skykit_agent_open_connections", "gauge"),
    ("skykit_agent_watchers", "gauge"),
    ("skykit_agent_sink_write_failures", "counter"),
];

/// Checks that every metric of [`FAMILIES`] is declared with its type,
/// except the `undeclared` ones, which must have no series yet.
fn check_families(exposition: &Exposition, undeclared: &[&str]) {
    let line = |name: &str, kind: &str| format!("skykit_agent_{name} {kind}\n");
    let expected: String = FAMILIES
        .iter()
        .map(|(name, kind)| {
            let short = &name["skykit_agent_".len()..];
            line(
                short,
                if undeclared.contains(&short) {
                    "undeclared"
                } else {
                    kind
                },
            )
        })
        .collect();
    let actual: String = FAMILIES
        .iter()
        .map(|(name, _)| {
            let kind = exposition
                .types
                .get(*name)
                .map_or("undeclared", String::as_str);
            line(&name["skykit_agent_".len()..], kind)
        })
        .collect();
    eqnice(&expected, &actual, "the declared metric types");
}

/// Waits until the metrics socket accepts connections.
fn wait_for_socket(socket: &Path, agent: &Agent<'_>) {
    eventually("the metrics socket", DEADLINE, agent, || {
        UnixStream::connect(socket)
            .map(drop)
            .map_err(|error| error.to_string())
    });
}

/// Polls `GetStatus` until its last reload's outcome is `ok`.
fn wait_for_reload(client: &Client<'_>, agent: &Agent<'_>, ok: bool) -> GetStatusResponse {
    eventually(&format!("a reload with ok = {ok}"), DEADLINE, agent, || {
        let status = client.status();
        match &status.last_reload {
            Some(reload) if reload.ok == ok => Ok(status),
            other => Err(format!("{other:?}")),
        }
    })
}

/// Starts an agent with the shared key as `private.pem` in `dir` and its
/// metrics on the Unix socket `dir/metrics.sock`; returns both once the
/// metrics socket accepts.
fn serve_with_unix_metrics(dir: &Dir) -> (Agent<'_>, PathBuf) {
    let metrics_socket = dir.join("metrics.sock");
    let config = write_config(
        dir,
        &shared_key().write(dir, "private.pem"),
        "",
        &metrics_table(&format!("unix:{}", metrics_socket.display())),
    );
    let agent = serve_config(dir, &config);
    wait_for_socket(&metrics_socket, &agent);
    (agent, metrics_socket)
}

/// Scrapes with `scrape` until `open_connections` reads 1; returns that scrape.
fn scrape_with_one_connection(agent: &Agent<'_>, scrape: impl Fn() -> Exposition) -> Exposition {
    eventually("open_connections 1", DEADLINE, agent, || {
        let exposition = scrape();
        match exposition.value("skykit_agent_open_connections", &[]) {
            Some(1.0) => Ok(exposition),
            other => Err(format!("{other:?}")),
        }
    })
}

/// `[metrics] listen = "..."`.
fn metrics_table(listen: &str) -> String {
    format!("[metrics]\nlisten = \"{listen}\"\n")
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// Known traffic, then a scrape over the Unix socket: two GetToken calls
/// (one signed, one from the cache), an unknown identity and a lifetime of
/// 3601 s (refused), a good reload and one with a broken key, and a watch
/// left open. Each counter shows exactly that; the gauges show the live
/// state; scraping changes nothing; closing the watch brings `watchers`
/// back to 0.
#[test]
fn counters_move_exactly_with_the_traffic_and_gauges_read_the_live_state() {
    let dir = Dir::new();
    let key = shared_key();
    let (agent, metrics_socket) = serve_with_unix_metrics(&dir);
    let rt = runtime();
    let client = Client::connect(&rt, agent.socket());

    let fresh = client.token("", None);
    check_response(&fresh, key, "default", 3600);
    let cached = client.token("", None);
    eqnice(&fresh.token, &cached.token, "the second token (cached)");
    for (identity, lifetime, code) in [
        ("nope", None, Code::NotFound),
        ("", Some(3601), Code::InvalidArgument),
    ] {
        match client.get_token(identity, lifetime) {
            Err(status) if status.code() == code => {}
            other => panic!("GetToken {identity:?} {lifetime:?}: expected {code:?}, got {other:?}"),
        }
    }
    agent.signal(Signal::HUP);
    wait_for_reload(&client, &agent, true);
    dir.write("private.pem", "not a key\n");
    agent.signal(Signal::HUP);
    let status = wait_for_reload(&client, &agent, false);
    let mut watcher = client.watching("", None);
    let watched = watcher.next(DEADLINE, &agent);
    eqnice(&fresh.token, &watched.token, "the watched token (cached)");

    // The only connection left is this client's (the start-up probe of
    // the socket closes on its own).
    let exposition = scrape_with_one_connection(&agent, || {
        Exposition::of(http_unix(&metrics_socket, "GET", "/metrics"))
    });
    check_families(&exposition, &["refresh_failures", "sink_write_failures"]);
    let protection = status
        .key_protection
        .expect("status reports key protection");
    let now = now_secs();
    let expiry =
        (fresh.expires_at.expect("expires_at is set").seconds as u64).saturating_sub(now) as f64;
    let counters: &[Expectation<'_>] = &[
        (
            "skykit_agent_tokens_issued_total",
            &[("identity", "default"), ("source", "fresh")],
            Want::Is(1.0),
        ),
        (
            "skykit_agent_tokens_issued_total",
            &[("identity", "default"), ("source", "cached")],
            Want::Is(1.0),
        ),
        (
            "skykit_agent_refusals_total",
            &[("reason", "not_found")],
            Want::Is(1.0),
        ),
        (
            "skykit_agent_refusals_total",
            &[("reason", "invalid_argument")],
            Want::Is(1.0),
        ),
        (
            "skykit_agent_refusals_total",
            &[("reason", "permission_denied")],
            Want::Absent,
        ),
        (
            "skykit_agent_reloads_total",
            &[("result", "ok")],
            Want::Is(1.0),
        ),
        (
            "skykit_agent_reloads_total",
            &[("result", "failed")],
            Want::Is(1.0),
        ),
        // One signature: the second call, the good reload (same key) and
        // the watch all used the cached token.
        ("skykit_agent_signing_seconds_count", &[], Want::Is(1.0)),
        (
            "skykit_agent_signing_seconds_sum",
            &[],
            Want::Between(1e-9, 10.0),
        ),
        // Only calls that got a token are timed.
        ("skykit_agent_get_token_seconds_count", &[], Want::Is(2.0)),
        (
            "skykit_agent_get_token_seconds_bucket",
            &[("le", "+Inf")],
            Want::Is(2.0),
        ),
        (
            "skykit_agent_refresh_failures_total",
            &[("identity", "default")],
            Want::Absent,
        ),
        ("skykit_agent_watchers", &[], Want::Is(1.0)),
        ("skykit_agent_open_connections", &[], Want::Is(1.0)),
        (
            "skykit_agent_token_expiry_seconds",
            &[("identity", "default")],
            // Scraped before `now` was read (whole seconds): up to 1 s more.
            Want::Between(expiry - 30.0, (expiry + 1.0).min(3600.0)),
        ),
        (
            "skykit_agent_key_protection",
            &[("measure", "non_dumpable")],
            Want::Is(1.0),
        ),
        (
            "skykit_agent_key_protection",
            &[("measure", "core_limit_zero")],
            Want::Is(f64::from(u8::from(protection.core_limit_zero))),
        ),
        (
            "skykit_agent_key_protection",
            &[("measure", "locked_bytes")],
            Want::Is(protection.locked_bytes as f64),
        ),
        (
            "skykit_agent_key_protection",
            &[("measure", "lock_failures")],
            Want::Is(f64::from(protection.lock_failures)),
        ),
    ];
    check(&exposition, counters);
    assert!(protection.non_dumpable, "status: the agent is dumpable");
    assert!(
        exposition
            .series("skykit_agent_sink_write_failures_total")
            .is_empty(),
        "no sink, so no sink failures:\n{}",
        exposition.text
    );
    let refusals: Vec<String> = exposition
        .series("skykit_agent_refusals_total")
        .iter()
        .map(|sample| format!("{:?}", sample.labels))
        .collect();
    assert_eq!(refusals.len(), 2, "other refusals counted: {refusals:?}");

    // Scraping is not traffic: the counters stay where they were.
    let again = Exposition::of(http_unix(&metrics_socket, "GET", "/metrics"));
    check(&again, counters);

    drop(watcher);
    eventually("watchers 0", DEADLINE, &agent, || {
        let exposition = Exposition::of(http_unix(&metrics_socket, "GET", "/metrics"));
        match exposition.value("skykit_agent_watchers", &[]) {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// Only `GET /metrics` is served: another path is 404 and another method
/// 405, each with a message saying where the metrics are.
#[test]
fn only_get_metrics_is_answered() {
    let dir = Dir::new();
    let (_agent, metrics_socket) = serve_with_unix_metrics(&dir);

    let cases = [
        ("GET", "/other", 404, "not found: metrics are at /metrics"),
        ("GET", "/", 404, "not found: metrics are at /metrics"),
        ("POST", "/metrics", 405, "only GET /metrics"),
        ("DELETE", "/metrics", 405, "only GET /metrics"),
    ];
    let expected: String = cases
        .iter()
        .map(|(method, path, status, body)| format!("{method} {path}: {status} {body}\n"))
        .collect();
    let actual: String = cases
        .iter()
        .map(|(method, path, _, _)| {
            let response = http_unix(&metrics_socket, method, path);
            format!(
                "{method} {path}: {} {}\n",
                response.status,
                response.body.trim_end()
            )
        })
        .collect();
    eqnice(&expected, &actual, "the answers to other requests");
    // The endpoint still serves after them.
    Exposition::of(http_unix(&metrics_socket, "GET", "/metrics"));
}

/// `listen = "127.0.0.1:PORT"`: the metrics come over loopback TCP, and
/// with two tokens of one identity cached, `token_expiry_seconds` shows
/// the one that expires first. The
/// port is one the kernel just handed out and the test released; should
/// something else take it first, the agent logs that it cannot listen
/// (and keeps serving tokens), and the test tries another.
#[test]
fn metrics_are_served_on_a_loopback_tcp_port() {
    let mut refused = Vec::new();
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("get a free port from the kernel")
            .port();
        let dir = Dir::new();
        let config = write_config(
            &dir,
            &shared_key().write(&dir, "private.pem"),
            "",
            &metrics_table(&format!("127.0.0.1:{port}")),
        );
        let agent = serve_config(&dir, &config);
        let serving = eventually("the metrics listener", DEADLINE, &agent, || {
            let stderr = agent.stderr();
            if stderr.contains("serving metrics") {
                Ok(true)
            } else if stderr.contains("cannot listen for metrics") {
                Ok(false)
            } else {
                Err("neither `serving metrics` nor `cannot listen for metrics` logged".into())
            }
        });
        if !serving {
            refused.push(agent.stderr());
            continue;
        }
        let rt = runtime();
        let client = Client::connect(&rt, agent.socket());
        let long = client.token("", None);
        check_response(&long, shared_key(), "default", 3600);
        let short = client.token("", Some(600));
        check_response(&short, shared_key(), "default", 600);
        let soonest = (short.expires_at.expect("expires_at is set").seconds as u64)
            .saturating_sub(now_secs()) as f64;
        let exposition = scrape_with_one_connection(&agent, || {
            Exposition::of(http_tcp(port, "GET", "/metrics"))
        });
        check_families(
            &exposition,
            &[
                "refusals",
                "refresh_failures",
                "reloads",
                "sink_write_failures",
            ],
        );
        check(
            &exposition,
            &[
                (
                    "skykit_agent_tokens_issued_total",
                    &[("identity", "default"), ("source", "fresh")],
                    Want::Is(2.0),
                ),
                ("skykit_agent_get_token_seconds_count", &[], Want::Is(2.0)),
                ("skykit_agent_watchers", &[], Want::Is(0.0)),
                // The sooner of the two cached tokens: the 600 s one.
                (
                    "skykit_agent_token_expiry_seconds",
                    &[("identity", "default")],
                    Want::Between(soonest - 30.0, soonest),
                ),
            ],
        );
        assert_eq!(http_tcp(port, "GET", "/other").status, 404);
        return;
    }
    panic!(
        "5 free ports were taken before the agent could listen on them:\n{}",
        refused.join("\n---\n")
    );
}

/// WatchToken applies GetToken's policy and validation, so its refusals
/// are refusals too: an unknown identity and a lifetime of 59 s count
/// under `not_found` and `invalid_argument`, as for GetToken.
#[test]
fn refused_watches_count_as_refusals() {
    let dir = Dir::new();
    let (agent, metrics_socket) = serve_with_unix_metrics(&dir);
    let rt = runtime();
    let client = Client::connect(&rt, agent.socket());
    for (identity, lifetime, code) in [
        ("nope", None, Code::NotFound),
        ("", Some(59), Code::InvalidArgument),
    ] {
        match client.watch(identity, lifetime) {
            Err(status) if status.code() == code => {}
            Err(status) => {
                panic!("WatchToken {identity:?} {lifetime:?}: expected {code:?}, got {status:?}")
            }
            Ok(_) => {
                panic!("WatchToken {identity:?} {lifetime:?}: expected {code:?}, got a stream")
            }
        }
    }
    check(
        &Exposition::of(http_unix(&metrics_socket, "GET", "/metrics")),
        &[
            (
                "skykit_agent_refusals_total",
                &[("reason", "not_found")],
                Want::Is(1.0),
            ),
            (
                "skykit_agent_refusals_total",
                &[("reason", "invalid_argument")],
                Want::Is(1.0),
            ),
        ],
    );
}
