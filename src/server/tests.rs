//! In-process server tests: `run` on a socket in a temp dir, stopped
//! through a oneshot, reached with the crate's own client.

use std::{path::PathBuf, sync::OnceLock};

use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus as Status_,
    health_client::HealthClient,
};

use super::*;
use crate::{
    client,
    config::{Config, IdentityConfig},
    identity::Identities,
    key::{Bits, SigningKey},
    socket,
};

/// One key for all tests here: generating RSA keys is slow.
fn key_pem(dir: &std::path::Path) -> PathBuf {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    let key = KEY.get_or_init(|| SigningKey::generate(Bits::Rsa2048).unwrap());
    let path = dir.join("private.pem");
    key.write_private_pem(&path).unwrap();
    path
}

struct Running {
    _dir: tempfile::TempDir,
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), Error>>,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("agent.sock");
    let config = Config {
        file: None,
        socket: socket_path.clone(),
        socket_mode: 0o600,
        socket_group: None,
        require_locked_memory: true,
        limits: crate::limits::Limits::default(),
        sinks: Vec::new(),
        metrics: None,
        proxy: None,
        identities: vec![IdentityConfig {
            name: "default".into(),
            issuer: "test@example.com".into(),
            key: key_pem(dir.path()),
            lifetime: Lifetime::MAX,
            default: true,
            allow_insecure_key_permissions: false,
            key_is_credential: false,
            policy: crate::policy::Policy::owner_and_root(rustix::process::geteuid().as_raw()),
        }],
    };
    let registry = Arc::new(Registry::new(Identities::load(&config).unwrap()));
    let access = socket::Access {
        mode: 0o600,
        group: None,
    };
    let mut bound = socket::bind(&socket_path, access).unwrap();
    let listener = UnixListener::from_std(bound.take_listener().unwrap()).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let tracker = Arc::new(crate::status::Tracker::new(socket_path.clone()));
    let limits = crate::limits::Limits {
        drain_timeout: Duration::from_millis(300),
        ..crate::limits::Limits::default()
    };
    let server = tokio::spawn(async move {
        let result = run(listener, Service::new(registry, tracker, limits), async {
            let _ = stopped.await;
        })
        .await;
        drop(bound);
        result
    });
    let channel = client::channel(&socket_path).await.unwrap();
    Running {
        _dir: dir,
        channel,
        stop: Some(stop),
        server,
    }
}

async fn check(health: &mut HealthClient<Channel>, service: &str) -> Result<i32, tonic::Status> {
    health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|response| response.into_inner().status)
}

#[tokio::test]
async fn health_is_serving_while_running_and_not_serving_once_shutdown_begins() {
    let mut running = start().await;
    let mut health = HealthClient::new(running.channel.clone());
    assert_eq!(
        check(&mut health, "").await.unwrap(),
        Status_::Serving as i32
    );
    assert_eq!(
        check(&mut health, TOKEN_SERVICE_NAME).await.unwrap(),
        Status_::Serving as i32
    );
    let unknown = check(&mut health, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut watch = health
        .watch(HealthCheckRequest {
            service: TOKEN_SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, Status_::Serving as i32);
    running.stop.take().unwrap().send(()).unwrap();
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, Status_::NotServing as i32);
    // The open watch stream never ends by itself; the drain deadline
    // bounds shutdown anyway.
    let finished = tokio::time::timeout(Duration::from_secs(20), running.server).await;
    assert!(
        finished
            .expect("shutdown is bounded by the grace period")
            .unwrap()
            .is_ok()
    );
}

#[tokio::test]
async fn reflection_v1_lists_every_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let running = start().await;
    let mut reflection = ServerReflectionClient::new(running.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream_once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let mut names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "skykit.agent.v1.AgentService",
            "skykit.agent.v1.TokenService"
        ]
    );
}

#[tokio::test]
async fn shutdown_with_no_calls_in_flight_is_immediate_and_clean() {
    let mut running = start().await;
    let mut tokens =
        crate::proto::token_service_client::TokenServiceClient::new(running.channel.clone());
    let response = tokens
        .get_token(GetTokenRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.identity, "default");
    drop(tokens);
    drop(running.channel);
    running.stop.take().unwrap().send(()).unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(20), running.server).await;
    assert!(finished.unwrap().unwrap().is_ok());
}

/// A request stream of exactly one message.
fn tokio_stream_once<T: Send + Unpin + 'static>(
    item: T,
) -> impl futures_core::Stream<Item = T> + Send + 'static {
    struct Once<T>(Option<T>);
    impl<T: Unpin> futures_core::Stream for Once<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.take())
        }
    }
    Once(Some(item))
}

#[tokio::test]
async fn an_oversized_unknown_identity_is_not_found_without_echoing_it() {
    let running = start().await;
    let mut tokens =
        crate::proto::token_service_client::TokenServiceClient::new(running.channel.clone());
    let huge = "x".repeat(16_000);
    let status = tokens
        .get_token(GetTokenRequest {
            identity: huge.clone(),
            ..GetTokenRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(
        status.message().contains("of 16000 bytes"),
        "{}",
        status.message()
    );
    assert!(status.message().len() < 300);
    let short = tokens
        .get_token(GetTokenRequest {
            identity: "nope".into(),
            ..GetTokenRequest::default()
        })
        .await
        .unwrap_err();
    assert!(short.message().contains("\"nope\""));
}

/// A service with one identity of its own name (the `tokens_issued`
/// counters are process-wide, keyed by identity), called in process.
fn service_for(name: &str, dir: &std::path::Path) -> Service {
    let config = Config {
        file: None,
        socket: dir.join("unused.sock"),
        socket_mode: 0o600,
        socket_group: None,
        require_locked_memory: false,
        limits: crate::limits::Limits::default(),
        sinks: Vec::new(),
        metrics: None,
        proxy: None,
        identities: vec![IdentityConfig {
            name: name.into(),
            issuer: "test@example.com".into(),
            key: key_pem(dir),
            lifetime: Lifetime::MAX,
            default: true,
            allow_insecure_key_permissions: false,
            key_is_credential: false,
            policy: crate::policy::Policy::owner_and_root(1000),
        }],
    };
    let registry = Arc::new(Registry::new(Identities::load(&config).unwrap()));
    let tracker = Arc::new(crate::status::Tracker::new(dir.join("unused.sock")));
    Service::new(registry, tracker, crate::limits::Limits::default())
}

/// A connection's caller, as the accept loop captures it.
fn caller(uid: u32) -> Caller {
    let peer = crate::peer::Peer {
        uid,
        gid: uid,
        pid: None,
    };
    Caller::new(peer, Arc::from([]), None)
}

/// A GetToken request on `caller`'s connection.
fn request_from(caller: &Caller) -> Request<GetTokenRequest> {
    let mut request = Request::new(GetTokenRequest::default());
    request.extensions_mut().insert(caller.clone());
    request
}

fn counts(service: &Service, name: &str) -> (u64, u64) {
    let identities = service.registry.current();
    let identity = identities.resolve(name).unwrap();
    (identity.issued_cached.get(), identity.issued_fresh.get())
}

#[tokio::test]
async fn a_cached_token_is_served_without_signing_and_counted_as_cached() {
    let dir = tempfile::tempdir().unwrap();
    let service = service_for("hot-path-cached", dir.path());
    let caller = caller(1000);
    let first = service
        .get_token(request_from(&caller))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counts(&service, "hot-path-cached"), (0, 1));
    for served in 1..=3 {
        let again = service
            .get_token(request_from(&caller))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again, first, "the same token and times, from the cache");
        assert_eq!(counts(&service, "hot-path-cached"), (served, 1));
    }
    // The cached token is there, yet a caller the policy refuses gets
    // nothing from it.
    let denied = service
        .get_token(request_from(&self::caller(4321)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(counts(&service, "hot-path-cached"), (3, 1));
}

#[tokio::test]
async fn sign_every_call_bypasses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let service = service_for("hot-path-every-call", dir.path()).signing_every_call();
    let caller = caller(1000);
    for signed in 1..=3 {
        service.get_token(request_from(&caller)).await.unwrap();
        assert_eq!(counts(&service, "hot-path-every-call"), (0, signed));
    }
    assert!(service.cache().is_empty(), "nothing was cached");
}
