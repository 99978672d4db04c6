//! `skykit-agent-bench`: the load generator and the reference points that
//! `bench/run.sh` measures the agent against (see BENCHMARKS.md).
//!
//! - `load` drives `GetToken` over the Unix socket with N calls in flight
//!   over M HTTP/2 connections, and reads the target's CPU time and peak
//!   RSS from `/proc`;
//! - `ceiling-server` is a bare tonic server on the same kind of socket that
//!   answers `GetToken` with a fixed token: the ceiling for the cached path;
//! - `sign-ceiling` makes raw RS256 signatures with the parsed key on K
//!   threads: the ceiling for signing;
//! - `idle` holds many idle connections and reports the agent's RSS;
//! - `ready` measures how soon a freshly started agent accepts connections;
//! - `report` turns the JSON of one run into the table of BENCHMARKS.md.
//!
//! Built only with `--features bench`, so `cargo install` leaves it out.
//! Timings are reported, never asserted.

#![deny(unsafe_code)]

use std::{
    fs, io,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    process::{self, Child, ExitCode, Stdio},
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use futures_core::Stream;
use serde::{Deserialize, Serialize};
use skykit_agent::{
    client, duration,
    key::{LoadOptions, SigningKey},
    proto::{
        GetTokenRequest, GetTokenResponse, ListIdentitiesRequest, ListIdentitiesResponse,
        WatchTokenRequest,
        token_service_client::TokenServiceClient,
        token_service_server::{TokenService, TokenServiceServer},
    },
    token::{self, Lifetime},
};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    task::JoinSet,
};
use tonic::{Request, Response, Status, transport::Channel};

/// The issuer every benchmark token carries.
const BENCH_ISSUER: &str = "bench@example.com";

/// Load generator and reference points for skykit-agent's benchmarks.
#[derive(Debug, Parser)]
#[command(name = "skykit-agent-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive GetToken with N calls in flight over M connections; print rate, latency and the target's CPU and RSS.
    Load(LoadArgs),
    /// A bare tonic server answering GetToken with a fixed token: the ceiling of the cached path.
    CeilingServer(CeilingArgs),
    /// Raw RS256 signatures with the parsed key on K threads: the ceiling of signing.
    SignCeiling(SignArgs),
    /// Open and hold idle connections (one GetToken each), then print the agent's RSS.
    Idle(IdleArgs),
    /// Start the agent repeatedly and measure how soon its socket accepts a connection.
    Ready(ReadyArgs),
    /// Print the table of one bench/run.sh run from the JSON files in a folder.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// A server's Unix socket; repeat it to measure several servers in
    /// alternating rounds, so that they share the machine's noise
    #[arg(long, value_name = "PATH", required = true)]
    socket: Vec<PathBuf>,
    /// A name for each --socket, in order [default: the socket's file name]
    #[arg(long, value_name = "NAME")]
    name: Vec<String>,
    /// The process behind each --socket, in order, whose CPU time (over the
    /// measured windows) and peak RSS to report
    #[arg(long, value_name = "PID")]
    pid: Vec<i32>,
    /// HTTP/2 connections the calls are spread over
    #[arg(long, value_name = "M", default_value_t = 4)]
    connections: usize,
    /// Calls kept in flight at all times
    #[arg(long, value_name = "N", default_value_t = 64)]
    in_flight: usize,
    /// How long to measure each server in all, after its warm-up
    #[arg(long, value_name = "T", default_value = "10s", value_parser = duration::parse)]
    duration: Duration,
    /// How long to run each server before its first measured window
    #[arg(long, value_name = "W", default_value = "2s", value_parser = duration::parse)]
    warmup: Duration,
    /// Measured windows per server: the servers take turns, each window
    /// lasting T / rounds after a short ramp
    #[arg(long, value_name = "R", default_value_t = 1)]
    rounds: u32,
    /// The lifetime to request [default: the identity's]
    #[arg(long, value_name = "D", value_parser = duration::parse)]
    lifetime: Option<Duration>,
    /// The identity to request [default: the default identity]
    #[arg(long, value_name = "NAME")]
    identity: Option<String>,
    /// Worker threads of the load generator; 1 is a current-thread runtime
    #[arg(long, value_name = "K", default_value_t = 1)]
    threads: usize,
    /// Print JSON instead of text: one object, or an array for several sockets
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CeilingArgs {
    /// The Unix socket to listen on
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
}

#[derive(Debug, Args)]
struct SignArgs {
    /// The private key (PEM), as the agent would load it
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Signing threads [default: the number of CPUs]
    #[arg(long, value_name = "K")]
    threads: Option<usize>,
    /// How long to measure, after the warm-up
    #[arg(long, value_name = "T", default_value = "10s", value_parser = duration::parse)]
    duration: Duration,
    /// How long to sign before measuring
    #[arg(long, value_name = "W", default_value = "1s", value_parser = duration::parse)]
    warmup: Duration,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct IdleArgs {
    /// The agent's Unix socket
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Idle connections to open and hold
    #[arg(long, value_name = "N", default_value_t = 1000)]
    connections: usize,
    /// The agent's process id
    #[arg(long, value_name = "PID")]
    pid: i32,
    /// Connections opened at the same time
    #[arg(long, value_name = "K", default_value_t = 32)]
    parallel: usize,
    /// How long to hold the connections before reading the RSS
    #[arg(long, value_name = "D", default_value = "1s", value_parser = duration::parse)]
    settle: Duration,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ReadyArgs {
    /// The agent binary
    #[arg(long, value_name = "PATH")]
    bin: PathBuf,
    /// How many times to start it
    #[arg(long, value_name = "R", default_value_t = 20)]
    repeat: usize,
    /// The socket to poll [default: the value of --socket among the agent's arguments]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Append the agent's stderr to this file [default: discard it]
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
    /// The agent's arguments, e.g. `serve --socket S --key K --issuer I`
    #[arg(last = true, required = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// The folder bench/run.sh wrote its JSON files to
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Load(args) => load(args),
        Command::CeilingServer(args) => ceiling_server(args),
        Command::SignCeiling(args) => sign_ceiling(args),
        Command::Idle(args) => idle(args),
        Command::Ready(args) => ready(args),
        Command::Report(args) => report(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("skykit-agent-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// load

/// Unmeasured time at the start of every window after a server's first,
/// so the calls of the server measured before have drained.
const RAMP: Duration = Duration::from_millis(500);

/// What `load --json` prints for each server.
#[derive(Debug, Serialize, Deserialize)]
struct LoadReport {
    name: String,
    connections: usize,
    in_flight: usize,
    generator_threads: usize,
    warmup_secs: f64,
    rounds: u32,
    /// The measured time, all windows together, in seconds.
    seconds: f64,
    /// Successful calls that completed inside the measured windows.
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Failed calls that completed inside the measured windows.
    errors: u64,
    first_error: Option<String>,
    target: Option<TargetUsage>,
    /// The load generator's own CPU time per second measured.
    generator_cores: f64,
}

/// The measured process's share of the machine over the windows.
#[derive(Debug, Serialize, Deserialize)]
struct TargetUsage {
    pid: i32,
    /// utime + stime per second measured: 1.0 is one core kept busy.
    cores: f64,
    /// CPU time per successful request, in microseconds.
    cpu_us_per_request: f64,
    /// `VmHWM` at the end: the peak resident set since the process started.
    peak_rss_kib: u64,
}

/// One server under test and what its windows have gathered so far.
struct Target {
    name: String,
    pid: Option<i32>,
    channels: Vec<Channel>,
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    /// Wall time between the CPU samples, all windows together.
    sampled: Duration,
    target_cpu: Duration,
    generator_cpu: Duration,
}

/// One in-flight slot's results.
#[derive(Default)]
struct SlotResult {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn load(args: LoadArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.in_flight == 0 || args.threads == 0 || args.rounds == 0 {
        bail!("--connections, --in-flight, --threads and --rounds must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be at least 1s");
    }
    if !args.pid.is_empty() && args.pid.len() != args.socket.len() {
        bail!("give one --pid for each --socket, or none");
    }
    if !args.name.is_empty() && args.name.len() != args.socket.len() {
        bail!("give one --name for each --socket, or none");
    }
    let runtime = runtime(args.threads)?;
    let reports = runtime.block_on(run_load(&args))?;
    if args.json {
        let json = match reports.as_slice() {
            [one] => serde_json::to_string_pretty(one)?,
            several => serde_json::to_string_pretty(several)?,
        };
        println!("{json}");
    } else {
        for report in &reports {
            print_load(report);
        }
    }
    Ok(())
}

/// A current-thread runtime for one thread, else a multi-thread one.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn run_load(args: &LoadArgs) -> anyhow::Result<Vec<LoadReport>> {
    let request = GetTokenRequest {
        identity: args.identity.clone().unwrap_or_default(),
        lifetime: args.lifetime.map(proto_duration),
        min_valid_for: None,
    };
    let mut targets = Vec::with_capacity(args.socket.len());
    for (index, socket) in args.socket.iter().enumerate() {
        let mut channels = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            let channel = client::channel(socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?;
            channels.push(channel);
        }
        // Fail early and clearly when the server refuses the request itself.
        TokenServiceClient::new(channels[0].clone())
            .get_token(request.clone())
            .await
            .map_err(|status| {
                anyhow!(
                    "the first GetToken on {} failed: {status}",
                    socket.display()
                )
            })?;
        targets.push(Target {
            name: args.name.get(index).cloned().unwrap_or_else(|| {
                socket.file_name().map_or_else(
                    || socket.display().to_string(),
                    |name| name.to_string_lossy().into_owned(),
                )
            }),
            pid: args.pid.get(index).copied(),
            channels,
            latencies_ns: Vec::new(),
            errors: 0,
            first_error: None,
            sampled: Duration::ZERO,
            target_cpu: Duration::ZERO,
            generator_cpu: Duration::ZERO,
        });
    }
    let window = args.duration / args.rounds;
    for round in 0..args.rounds {
        for target in &mut targets {
            let unmeasured = if round == 0 { args.warmup } else { RAMP };
            measure_window(target, &request, args.in_flight, unmeasured, window).await?;
        }
    }
    targets
        .into_iter()
        .map(|mut target| {
            target.latencies_ns.sort_unstable();
            let latencies = &target.latencies_ns;
            let requests = latencies.len() as u64;
            let seconds = (window * args.rounds).as_secs_f64();
            let sampled = target.sampled.as_secs_f64().max(f64::EPSILON);
            let rps = requests as f64 / seconds;
            let usage = match target.pid {
                Some(pid) => {
                    let cores = target.target_cpu.as_secs_f64() / sampled;
                    Some(TargetUsage {
                        pid,
                        cores,
                        cpu_us_per_request: cores * 1e6 / rps.max(f64::EPSILON),
                        peak_rss_kib: status_kib(&pid.to_string(), "VmHWM")?,
                    })
                }
                None => None,
            };
            Ok(LoadReport {
                name: target.name,
                connections: args.connections,
                in_flight: args.in_flight,
                generator_threads: args.threads,
                warmup_secs: args.warmup.as_secs_f64(),
                rounds: args.rounds,
                seconds,
                requests,
                rps,
                p50_ms: ms(percentile(latencies, 0.50)),
                p90_ms: ms(percentile(latencies, 0.90)),
                p99_ms: ms(percentile(latencies, 0.99)),
                max_ms: ms(latencies.last().copied().unwrap_or(0)),
                errors: target.errors,
                first_error: target.first_error,
                target: usage,
                generator_cores: target.generator_cpu.as_secs_f64() / sampled,
            })
        })
        .collect()
}

/// Keeps `in_flight` calls going against one server for `unmeasured`, then
/// records every call that completes during the next `measured`.
async fn measure_window(
    target: &mut Target,
    request: &GetTokenRequest,
    in_flight: usize,
    unmeasured: Duration,
    measured: Duration,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let measure_from = started + unmeasured;
    let measure_until = measure_from + measured;
    let mut slots = JoinSet::new();
    for slot in 0..in_flight {
        let mut client =
            TokenServiceClient::new(target.channels[slot % target.channels.len()].clone());
        let request = request.clone();
        let (from, until) = (measure_from.into_std(), measure_until.into_std());
        slots.spawn(async move {
            let mut result = SlotResult::default();
            loop {
                let sent = Instant::now();
                let outcome = client.get_token(request.clone()).await;
                let done = Instant::now();
                if done >= until {
                    break;
                }
                if done < from {
                    continue;
                }
                match outcome {
                    Ok(_) => result
                        .latencies_ns
                        .push(u64::try_from((done - sent).as_nanos()).unwrap_or(u64::MAX)),
                    Err(status) => {
                        result.errors += 1;
                        result.first_error.get_or_insert_with(|| status.to_string());
                    }
                }
            }
            result
        });
    }

    tokio::time::sleep_until(measure_from).await;
    let sample_start = Instant::now();
    let target_before = target.pid.map(cpu_time).transpose()?;
    let generator_before = cpu_time_of("self")?;
    tokio::time::sleep_until(measure_until).await;
    let target_after = target.pid.map(cpu_time).transpose()?;
    let generator_after = cpu_time_of("self")?;
    target.sampled += sample_start.elapsed();
    if let (Some(before), Some(after)) = (target_before, target_after) {
        target.target_cpu += after.saturating_sub(before);
    }
    target.generator_cpu += generator_after.saturating_sub(generator_before);

    while let Some(slot) = slots.join_next().await {
        let slot = slot.context("a load task panicked")?;
        target.latencies_ns.extend(slot.latencies_ns);
        target.errors += slot.errors;
        if target.first_error.is_none() {
            target.first_error = slot.first_error;
        }
    }
    Ok(())
}

fn print_load(report: &LoadReport) {
    println!(
        "load {}: {} in flight over {} connections, {:.1} s measured in {} window(s) after {:.0} s of warm-up ({} generator thread(s))",
        report.name,
        report.in_flight,
        report.connections,
        report.seconds,
        report.rounds,
        report.warmup_secs,
        report.generator_threads
    );
    println!(
        "  requests/s  {:.0} ({} calls)",
        report.rps, report.requests
    );
    println!(
        "  latency     p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
        report.p50_ms, report.p90_ms, report.p99_ms, report.max_ms
    );
    match &report.first_error {
        None => println!("  errors      {}", report.errors),
        Some(error) => println!("  errors      {} (first: {error})", report.errors),
    }
    if let Some(target) = &report.target {
        println!(
            "  target      pid {}: CPU {:.0}% of one core, {:.1} µs per request; peak RSS {:.1} MiB",
            target.pid,
            100.0 * target.cores,
            target.cpu_us_per_request,
            mib(target.peak_rss_kib)
        );
    }
    println!(
        "  generator   CPU {:.0}% of one core",
        100.0 * report.generator_cores
    );
}

/// Nearest-rank percentile of sorted values; 0 when there are none.
fn percentile(sorted: &[u64], quantile: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

// ---------------------------------------------------------------------------
// /proc

/// utime + stime of a process, all threads, from `/proc/PID/stat`.
fn cpu_time(pid: i32) -> anyhow::Result<Duration> {
    cpu_time_of(&pid.to_string())
}

fn cpu_time_of(pid: &str) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may hold spaces; the fields after it are
    // numbered from 3 (the state): utime is field 14, stime field 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |number: usize| -> anyhow::Result<u64> {
        fields
            .get(number - 3)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| anyhow!("{path} has no field {number}"))
    };
    let ticks = field(14)? + field(15)?;
    let per_second = rustix::param::clock_ticks_per_second();
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// A `kB` field of `/proc/PID/status`, such as `VmRSS` or `VmHWM`.
fn status_kib(pid: &str, name: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("{path} has no {name}"))
}

// ---------------------------------------------------------------------------
// ceiling-server

/// Answers every `GetToken` with the same response: no policy, no cache,
/// no logging, so it costs what tonic and the socket cost and no more.
struct Ceiling {
    response: GetTokenResponse,
}

#[tonic::async_trait]
impl TokenService for Ceiling {
    async fn get_token(
        &self,
        _request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        // A clone, as the agent copies its cached strings into each response.
        Ok(Response::new(self.response.clone()))
    }

    async fn list_identities(
        &self,
        _request: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        Ok(Response::new(ListIdentitiesResponse::default()))
    }

    type WatchTokenStream =
        Pin<Box<dyn Stream<Item = Result<GetTokenResponse, Status>> + Send + 'static>>;

    async fn watch_token(
        &self,
        _request: Request<WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        Err(Status::unimplemented(
            "the ceiling server answers GetToken only",
        ))
    }
}

/// A response the size of the agent's: a token with real header and
/// claims for [`BENCH_ISSUER`] and a dummy 2048-bit signature.
fn fixed_response() -> GetTokenResponse {
    let issued_at = 1_700_000_000;
    let expires_at = issued_at + 3600;
    let signature = "A".repeat(2048 / 8 * 4 / 3 + 1);
    let timestamp = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
    GetTokenResponse {
        token: format!(
            "{}.{signature}",
            token::signing_input(BENCH_ISSUER, issued_at, expires_at)
        ),
        issued_at: Some(timestamp(issued_at as i64)),
        expires_at: Some(timestamp(expires_at as i64)),
        refresh_after: Some(timestamp(issued_at as i64 + 1800)),
        issuer: BENCH_ISSUER.to_owned(),
        identity: "default".to_owned(),
        key_id: "A".repeat(43),
    }
}

/// Accepted connections straight from tokio's listener: no credentials,
/// no logging, nothing per connection beyond what tonic does.
struct PlainIncoming(UnixListener);

impl Stream for PlainIncoming {
    type Item = io::Result<UnixStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0
            .poll_accept(cx)
            .map(|accepted| Some(accepted.map(|(stream, _)| stream)))
    }
}

fn ceiling_server(args: CeilingArgs) -> anyhow::Result<()> {
    // The agent's runtime: multi-threaded, one worker per CPU.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        remove_stale_socket(&args.socket)?;
        let listener = UnixListener::bind(&args.socket)
            .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let served = tonic::transport::Server::builder()
            .add_service(TokenServiceServer::new(Ceiling {
                response: fixed_response(),
            }))
            .serve_with_incoming_shutdown(PlainIncoming(listener), shutdown)
            .await;
        let _ = fs::remove_file(&args.socket);
        served.context("the ceiling server failed")
    })
}

/// Removes a socket file left behind by an earlier run; never anything else.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => fs::remove_file(path)
            .with_context(|| format!("cannot remove the old socket {}", path.display())),
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// sign-ceiling

/// What `sign-ceiling --json` prints.
#[derive(Debug, Serialize, Deserialize)]
struct SignReport {
    threads: usize,
    seconds: f64,
    signatures: u64,
    signatures_per_sec: f64,
    /// Wall time of one signature on one thread, in microseconds.
    us_per_signature: f64,
    /// The process's CPU time per signature, in microseconds: unlike the
    /// rate, it does not depend on how much of a shared machine it got.
    cpu_us_per_signature: f64,
    /// CPU time per second measured: 1.0 is one core kept busy.
    cores: f64,
    key_bits: usize,
}

fn sign_ceiling(args: SignArgs) -> anyhow::Result<()> {
    let threads = args.threads.unwrap_or_else(cpus);
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let key = SigningKey::load(&args.key, LoadOptions::default())?;
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let measure_until = measure_from + args.duration;
    let issued_at = unix_now();
    let (counts, cpu, sampled) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut signatures = 0;
                    loop {
                        token::issue(&key, BENCH_ISSUER, issued_at, Lifetime::MAX)
                            .map_err(|error| anyhow!("{error}"))?;
                        let now = Instant::now();
                        if now >= measure_until {
                            return Ok(signatures);
                        }
                        if now >= measure_from {
                            signatures += 1;
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        let sample_start = Instant::now();
        let before = cpu_time_of("self");
        std::thread::sleep(measure_until.saturating_duration_since(Instant::now()));
        let after = cpu_time_of("self");
        let sampled = sample_start.elapsed();
        let counts: Vec<anyhow::Result<u64>> = workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a signing thread panicked")))
            })
            .collect();
        (
            counts,
            before.and_then(|before| Ok(after? - before)),
            sampled,
        )
    });
    let mut signatures = 0;
    for count in counts {
        signatures += count?;
    }
    let cores = cpu?.as_secs_f64() / sampled.as_secs_f64().max(f64::EPSILON);
    let seconds = args.duration.as_secs_f64();
    let signatures_per_sec = signatures as f64 / seconds;
    let report = SignReport {
        threads,
        seconds,
        signatures,
        signatures_per_sec,
        us_per_signature: seconds * 1e6 * threads as f64 / signatures.max(1) as f64,
        cpu_us_per_signature: cores * 1e6 / signatures_per_sec.max(f64::EPSILON),
        cores,
        key_bits: key.bits(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "sign-ceiling: {} threads, {}-bit key, {:.1} s: {:.0} signatures/s ({:.0} µs per signature per thread; {:.0} µs CPU per signature, {:.0}% of one core)",
            report.threads,
            report.key_bits,
            report.seconds,
            report.signatures_per_sec,
            report.us_per_signature,
            report.cpu_us_per_signature,
            100.0 * report.cores
        );
    }
    Ok(())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

// ---------------------------------------------------------------------------
// idle

/// What `idle --json` prints.
#[derive(Debug, Serialize, Deserialize)]
struct IdleReport {
    connections: usize,
    pid: i32,
    /// The agent's `VmRSS` before the connections were opened.
    rss_before_kib: u64,
    /// Its `VmRSS` while all of them are open and idle.
    rss_kib: u64,
    /// Its `VmHWM` then.
    peak_rss_kib: u64,
}

fn idle(args: IdleArgs) -> anyhow::Result<()> {
    raise_descriptor_limit();
    let pid = args.pid.to_string();
    let rss_before_kib = status_kib(&pid, "VmRSS")?;
    let runtime = runtime(1)?;
    let held = runtime.block_on(open_idle(&args))?;
    let rss_kib = status_kib(&pid, "VmRSS")?;
    let peak_rss_kib = status_kib(&pid, "VmHWM")?;
    drop(held);
    let report = IdleReport {
        connections: args.connections,
        pid: args.pid,
        rss_before_kib,
        rss_kib,
        peak_rss_kib,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "idle: {} connections held; agent pid {} RSS {:.1} MiB (before: {:.1} MiB, peak: {:.1} MiB)",
            report.connections,
            report.pid,
            mib(report.rss_kib),
            mib(report.rss_before_kib),
            mib(report.peak_rss_kib)
        );
    }
    Ok(())
}

/// Opens the connections, each fully established by one `GetToken`, and
/// returns them once they have been idle for `settle`.
async fn open_idle(args: &IdleArgs) -> anyhow::Result<Vec<Channel>> {
    let permits = Arc::new(Semaphore::new(args.parallel.max(1)));
    let mut opening = JoinSet::new();
    for _ in 0..args.connections {
        let permits = permits.clone();
        let socket = args.socket.clone();
        opening.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let channel = client::channel(&socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?;
            TokenServiceClient::new(channel.clone())
                .get_token(GetTokenRequest::default())
                .await
                .map_err(|status| anyhow!("GetToken failed on a new connection: {status}"))?;
            Ok::<_, anyhow::Error>(channel)
        });
    }
    let mut held = Vec::with_capacity(args.connections);
    while let Some(opened) = opening.join_next().await {
        held.push(opened.context("a connecting task panicked")??);
    }
    tokio::time::sleep(args.settle).await;
    Ok(held)
}

/// Raises the soft descriptor limit to the hard one, so a thousand
/// connections fit; failing that, connecting reports the error.
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.maximum != limit.current {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

// ---------------------------------------------------------------------------
// ready

/// What `ready --json` prints.
#[derive(Debug, Serialize, Deserialize)]
struct ReadyReport {
    runs: usize,
    /// From spawning the agent to its socket accepting a connection.
    median_ms: f64,
    max_ms: f64,
    min_ms: f64,
    /// From spawning the agent to the first token received (one signature included).
    first_token_median_ms: f64,
    first_token_max_ms: f64,
}

fn ready(args: ReadyArgs) -> anyhow::Result<()> {
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let socket = match &args.socket {
        Some(socket) => socket.clone(),
        None => socket_argument(&args.args)
            .ok_or_else(|| anyhow!("name the socket: pass --socket to the agent or to ready"))?,
    };
    let runtime = runtime(1)?;
    let mut accepting = Vec::with_capacity(args.repeat);
    let mut first_token = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        let stderr = match &args.log {
            Some(path) => Stdio::from(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
            ),
            None => Stdio::null(),
        };
        let started = Instant::now();
        let mut agent = process::Command::new(&args.bin)
            .args(&args.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", args.bin.display()))?;
        let measured = measure_start(&runtime, &mut agent, &socket, started);
        stop(&mut agent)?;
        let (until_accepting, until_token) = measured?;
        accepting.push(until_accepting);
        first_token.push(until_token);
    }
    let report = ReadyReport {
        runs: args.repeat,
        median_ms: median(&mut accepting),
        max_ms: accepting.iter().copied().fold(0.0, f64::max),
        min_ms: accepting.iter().copied().fold(f64::INFINITY, f64::min),
        first_token_median_ms: median(&mut first_token),
        first_token_max_ms: first_token.iter().copied().fold(0.0, f64::max),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "ready: {} starts; socket accepting after median {:.1} ms (min {:.1}, max {:.1}); first token after median {:.1} ms (max {:.1})",
            report.runs,
            report.median_ms,
            report.min_ms,
            report.max_ms,
            report.first_token_median_ms,
            report.first_token_max_ms
        );
    }
    Ok(())
}

/// The value of `--socket` among the agent's arguments.
fn socket_argument(args: &[String]) -> Option<PathBuf> {
    args.iter().enumerate().find_map(|(index, arg)| {
        if arg == "--socket" {
            args.get(index + 1).map(PathBuf::from)
        } else {
            arg.strip_prefix("--socket=").map(PathBuf::from)
        }
    })
}

/// Milliseconds from `started` until the socket accepts a connection, and
/// until the first token arrives.
fn measure_start(
    runtime: &tokio::runtime::Runtime,
    agent: &mut Child,
    socket: &Path,
    started: Instant,
) -> anyhow::Result<(f64, f64)> {
    let deadline = started + Duration::from_secs(10);
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            break;
        }
        if let Some(status) = agent.try_wait()? {
            bail!("the agent exited ({status}) before its socket accepted a connection");
        }
        if Instant::now() >= deadline {
            bail!("the agent's socket did not accept a connection within 10 s");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let accepting = started.elapsed();
    runtime.block_on(async {
        client::connect_path(socket)
            .await?
            .get_token(GetTokenRequest::default())
            .await
            .map_err(|status| anyhow!("the first GetToken failed: {status}"))
    })?;
    let token = started.elapsed();
    Ok((accepting.as_secs_f64() * 1e3, token.as_secs_f64() * 1e3))
}

/// SIGTERM, then waits; the agent removes its socket on the way out.
fn stop(agent: &mut Child) -> anyhow::Result<()> {
    let pid = rustix::process::Pid::from_child(agent);
    if agent.try_wait()?.is_none() {
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("cannot stop the agent")?;
    }
    agent.wait().context("cannot wait for the agent")?;
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

// ---------------------------------------------------------------------------
// report

/// The targets of issue 6 (see BENCHMARKS.md).
const TARGET_CACHED_RATIO: f64 = 0.95;
const TARGET_CACHED_P99_MS: f64 = 5.0;
const TARGET_SIGNING_RATIO: f64 = 0.90;
const TARGET_TOKEN_SPEEDUP: f64 = 30.0;
const TARGET_IDLE_RSS_MIB: f64 = 32.0;
const TARGET_READY_MS: f64 = 100.0;

/// One row of the table.
struct Row {
    check: String,
    measured: String,
    reference: String,
    ratio: String,
    target: String,
    result: &'static str,
}

impl Row {
    fn info(check: &str, measured: String, reference: String, ratio: String) -> Row {
        Row {
            check: check.to_owned(),
            measured,
            reference,
            ratio,
            target: "-".to_owned(),
            result: "info",
        }
    }

    fn missing(check: &str, file: &str) -> Row {
        Row {
            check: check.to_owned(),
            measured: format!("not run ({file} missing)"),
            reference: "-".to_owned(),
            ratio: "-".to_owned(),
            target: "-".to_owned(),
            result: "MISS",
        }
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "PASS" } else { "MISS" }
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, file: &str) -> Option<T> {
    let text = fs::read_to_string(dir.join(file)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The files `PREFIX.1.json`, `PREFIX.2.json`... that alternating rounds wrote.
fn read_rounds<T: serde::de::DeserializeOwned>(dir: &Path, prefix: &str) -> Vec<T> {
    (1..)
        .map_while(|round| read_json(dir, &format!("{prefix}.{round}.json")))
        .collect()
}

/// The signing ceiling over all its rounds.
fn combine_sign(rounds: &[SignReport]) -> Option<SignReport> {
    let first = rounds.first()?;
    let signatures = rounds.iter().map(|round| round.signatures).sum::<u64>();
    let seconds = rounds.iter().map(|round| round.seconds).sum::<f64>();
    let cpu_secs = rounds
        .iter()
        .map(|round| round.cores * round.seconds)
        .sum::<f64>();
    Some(SignReport {
        threads: first.threads,
        seconds,
        signatures,
        signatures_per_sec: signatures as f64 / seconds,
        us_per_signature: seconds * 1e6 * first.threads as f64 / signatures.max(1) as f64,
        cpu_us_per_signature: cpu_secs * 1e6 / signatures.max(1) as f64,
        cores: cpu_secs / seconds,
        key_bits: first.key_bits,
    })
}

/// A load run over all its rounds: the rate over all of them; latency
/// percentiles and CPU figures as the median of the rounds', the maximum
/// as the maximum.
fn combine_load(rounds: Vec<LoadReport>) -> Option<LoadReport> {
    let count = rounds.len();
    let mut rounds = rounds.into_iter();
    let mut combined = rounds.next()?;
    let usage = |load: &LoadReport| {
        load.target.as_ref().map_or((0.0, 0.0), |target| {
            (target.cpu_us_per_request, target.cores)
        })
    };
    let mut p50 = vec![combined.p50_ms];
    let mut p90 = vec![combined.p90_ms];
    let mut p99 = vec![combined.p99_ms];
    let mut cpu = vec![usage(&combined).0];
    let mut cores = vec![usage(&combined).1];
    for round in rounds {
        combined.seconds += round.seconds;
        combined.requests += round.requests;
        combined.errors += round.errors;
        combined.first_error = combined.first_error.or(round.first_error.clone());
        combined.max_ms = combined.max_ms.max(round.max_ms);
        p50.push(round.p50_ms);
        p90.push(round.p90_ms);
        p99.push(round.p99_ms);
        cpu.push(usage(&round).0);
        cores.push(usage(&round).1);
        if let (Some(mine), Some(theirs)) = (combined.target.as_mut(), round.target) {
            mine.peak_rss_kib = mine.peak_rss_kib.max(theirs.peak_rss_kib);
        }
    }
    combined.rounds = u32::try_from(count).unwrap_or(u32::MAX);
    combined.rps = combined.requests as f64 / combined.seconds;
    combined.p50_ms = median(&mut p50);
    combined.p90_ms = median(&mut p90);
    combined.p99_ms = median(&mut p99);
    if let Some(target) = combined.target.as_mut() {
        target.cpu_us_per_request = median(&mut cpu);
        target.cores = median(&mut cores);
    }
    Some(combined)
}

fn report(args: ReportArgs) -> anyhow::Result<()> {
    if !args.dir.is_dir() {
        bail!("{} is not a folder", args.dir.display());
    }
    let dir = &args.dir;
    let cached: Vec<LoadReport> = read_json(dir, "cached.json").unwrap_or_default();
    let (mut ceiling, mut agent) = (None, None);
    for load in cached {
        match load.name.as_str() {
            "ceiling" => ceiling = Some(load),
            "agent" => agent = Some(load),
            _ => {}
        }
    }
    let sign = combine_sign(&read_rounds::<SignReport>(dir, "sign-ceiling"));
    let every = combine_load(read_rounds(dir, "sign-every-call"));
    let hyperfine: Option<serde_json::Value> = read_json(dir, "hyperfine.json");
    let idle: Option<IdleReport> = read_json(dir, "idle.json");
    let ceiling_idle: Option<IdleReport> = read_json(dir, "ceiling-idle.json");
    let ready: Option<ReadyReport> = read_json(dir, "ready.json");
    let mut rows = Vec::new();

    let load_cell = |load: &LoadReport| {
        format!(
            "{:.0} req/s; p50 {:.2} ms, p99 {:.2} ms; {} errors",
            load.rps, load.p50_ms, load.p99_ms, load.errors
        )
    };
    let usage_cell = |load: &LoadReport| {
        load.target.as_ref().map_or("-".to_owned(), |target| {
            format!(
                "{:.1} µs CPU/req ({:.0}% of a core), peak RSS {:.1} MiB",
                target.cpu_us_per_request,
                100.0 * target.cores,
                mib(target.peak_rss_kib)
            )
        })
    };
    match &ceiling {
        Some(ceiling) => rows.push(Row::info(
            "(a) ceiling: bare tonic, fixed token, 64 in flight / 4 conns",
            load_cell(ceiling),
            usage_cell(ceiling),
            "-".to_owned(),
        )),
        None => rows.push(Row::missing("(a) ceiling", "ceiling.json")),
    }
    match (&agent, &ceiling) {
        (Some(agent), Some(ceiling)) => {
            let ratio = agent.rps / ceiling.rps;
            rows.push(Row {
                check: "(b) agent, cached GetToken: req/s vs (a)".to_owned(),
                measured: load_cell(agent),
                reference: format!("{:.0} req/s", ceiling.rps),
                ratio: format!("{ratio:.3}"),
                target: format!(">= {TARGET_CACHED_RATIO:.2}"),
                result: verdict(ratio >= TARGET_CACHED_RATIO && agent.errors == 0),
            });
            rows.push(Row {
                check: "(b) agent, cached GetToken: p99 latency".to_owned(),
                measured: format!("{:.2} ms (max {:.2} ms)", agent.p99_ms, agent.max_ms),
                reference: format!("{:.2} ms", ceiling.p99_ms),
                ratio: format!("{:.2}", agent.p99_ms / ceiling.p99_ms),
                target: format!("< {TARGET_CACHED_P99_MS:.0} ms"),
                result: verdict(agent.p99_ms < TARGET_CACHED_P99_MS),
            });
            if let (Some(mine), Some(theirs)) = (&agent.target, &ceiling.target) {
                rows.push(Row::info(
                    "(b) agent, cached GetToken: server CPU per request vs (a)",
                    usage_cell(agent),
                    format!("{:.1} µs CPU/req", theirs.cpu_us_per_request),
                    format!("{:.2}", mine.cpu_us_per_request / theirs.cpu_us_per_request),
                ));
            }
        }
        _ => rows.push(Row::missing("(b) agent, cached GetToken", "agent.json")),
    }
    match &sign {
        Some(sign) => rows.push(Row::info(
            &format!("(c) signing ceiling: raw RS256, {} threads", sign.threads),
            format!(
                "{:.0} signatures/s ({:.0} µs each per thread, {}-bit key)",
                sign.signatures_per_sec, sign.us_per_signature, sign.key_bits
            ),
            format!(
                "{:.0} µs CPU/signature ({:.0}% of a core)",
                sign.cpu_us_per_signature,
                100.0 * sign.cores
            ),
            "-".to_owned(),
        )),
        None => rows.push(Row::missing("(c) signing ceiling", "sign-ceiling.json")),
    }
    match (&every, &sign) {
        (Some(every), Some(sign)) => {
            // On a shared machine the rate also depends on the share of the
            // CPUs each got (the agent runs a blocking thread per call in
            // flight, the ceiling one per CPU); CPU time per signature does
            // not. Both must meet the target.
            let by_rate = every.rps / sign.signatures_per_sec;
            let by_cpu = every.target.as_ref().map_or(0.0, |target| {
                sign.cpu_us_per_signature / target.cpu_us_per_request
            });
            rows.push(Row {
                check: "(d) agent, --bench-sign-every-call: req/s and CPU per signature vs (c)"
                    .to_owned(),
                measured: format!("{}; {}", load_cell(every), usage_cell(every)),
                reference: format!(
                    "{:.0} signatures/s, {:.0} µs CPU/signature",
                    sign.signatures_per_sec, sign.cpu_us_per_signature
                ),
                ratio: format!("{by_rate:.3} by rate, {by_cpu:.3} by CPU"),
                target: format!(">= {TARGET_SIGNING_RATIO:.2} (both)"),
                result: verdict(by_rate.min(by_cpu) >= TARGET_SIGNING_RATIO && every.errors == 0),
            });
        }
        _ => rows.push(Row::missing(
            "(d) agent signing every call",
            "sign-every-call.json",
        )),
    }
    match hyperfine.as_ref().and_then(hyperfine_medians) {
        Some((agent_token, python)) => {
            let speedup = python / agent_token;
            rows.push(Row {
                check: "(e) `skykit-agent token` vs python-jose script (median)".to_owned(),
                measured: format!("{:.2} ms", agent_token * 1e3),
                reference: format!("{:.1} ms", python * 1e3),
                ratio: format!("{speedup:.1}x faster"),
                target: format!(">= {TARGET_TOKEN_SPEEDUP:.0}x"),
                result: verdict(speedup >= TARGET_TOKEN_SPEEDUP),
            });
        }
        None => rows.push(Row::missing("(e) token vs python-jose", "hyperfine.json")),
    }
    match &idle {
        Some(idle) => rows.push(Row {
            check: format!("(f) agent RSS with {} idle connections", idle.connections),
            measured: format!("{:.1} MiB", mib(idle.rss_kib)),
            reference: match &ceiling_idle {
                Some(bare) => format!(
                    "{:.1} MiB before; bare tonic: {:.1} MiB (from {:.1})",
                    mib(idle.rss_before_kib),
                    mib(bare.rss_kib),
                    mib(bare.rss_before_kib)
                ),
                None => format!("{:.1} MiB before", mib(idle.rss_before_kib)),
            },
            ratio: "-".to_owned(),
            target: format!("< {TARGET_IDLE_RSS_MIB:.0} MiB"),
            result: verdict(mib(idle.rss_kib) < TARGET_IDLE_RSS_MIB),
        }),
        None => rows.push(Row::missing("(f) idle RSS", "idle.json")),
    }
    match &ready {
        Some(ready) => rows.push(Row {
            check: format!(
                "(g) ready (socket accepting), one 2048-bit key, {} starts",
                ready.runs
            ),
            measured: format!(
                "median {:.1} ms, max {:.1} ms",
                ready.median_ms, ready.max_ms
            ),
            reference: format!("first token: median {:.1} ms", ready.first_token_median_ms),
            ratio: "-".to_owned(),
            target: format!("< {TARGET_READY_MS:.0} ms (median)"),
            result: verdict(ready.median_ms < TARGET_READY_MS),
        }),
        None => rows.push(Row::missing("(g) ready", "ready.json")),
    }

    println!("| check | measured | reference | ratio | target | result |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            row.check, row.measured, row.reference, row.ratio, row.target, row.result
        );
    }
    let missed = rows.iter().filter(|row| row.result == "MISS").count();
    println!();
    println!(
        "{} checks: {} PASS, {missed} MISS",
        rows.iter().filter(|row| row.result != "info").count(),
        rows.iter().filter(|row| row.result == "PASS").count()
    );
    Ok(())
}

/// The medians, in seconds, of the hyperfine commands named
/// `skykit-agent-token` and `python-jose`.
fn hyperfine_medians(hyperfine: &serde_json::Value) -> Option<(f64, f64)> {
    let results = hyperfine.get("results")?.as_array()?;
    let median_of = |name: &str| {
        results
            .iter()
            .find(|result| result.get("command").and_then(|c| c.as_str()) == Some(name))
            .and_then(|result| result.get("median")?.as_f64())
    };
    Some((median_of("skykit-agent-token")?, median_of("python-jose")?))
}
