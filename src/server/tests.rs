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
