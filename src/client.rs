//! Reaching the agent: the socket discovery rule that every client (this
//! CLI and the libraries in `clients/`) follows, and a gRPC channel over
//! the Unix socket.
//!
//! The rule: the explicit path, else `$SKYKIT_AGENT_SOCKET`, else the first
//! of `$XDG_RUNTIME_DIR/skykit-agent/agent.sock` and
//! `/run/skykit-agent/agent.sock` that exists. Clients never read the
//! agent's config.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    config::{ENV_SOCKET, ENV_XDG_RUNTIME_DIR, Env, SOCKET_FILE, SYSTEM_SOCKET, USER_SOCKET_DIR},
    proto::token_service_client::TokenServiceClient,
};

/// A socket path to try and what named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub named_by: &'static str,
}

/// One path that was tried, and why it did not work.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub candidate: Candidate,
    pub reason: String,
}

/// No agent could be reached; lists every path tried.
#[derive(Debug, Clone)]
pub struct Unreachable {
    pub attempts: Vec<Attempt>,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot reach skykit-agent; tried:")?;
        for attempt in &self.attempts {
            write!(
                f,
                "\n  {} ({}): {}",
                attempt.candidate.path.display(),
                attempt.candidate.named_by,
                attempt.reason
            )?;
        }
        write!(
            f,
            "\nstart the agent (`skykit-agent serve`, or `systemctl start skykit-agent`), or name its socket with --socket or {ENV_SOCKET}"
        )
    }
}

impl std::error::Error for Unreachable {}

/// The paths to consider, in order.
pub fn candidates(explicit: Option<&Path>, env: &dyn Env) -> Vec<Candidate> {
    if let Some(path) = explicit {
        return vec![Candidate {
            path: path.to_owned(),
            named_by: "--socket",
        }];
    }
    if let Some(path) = env.non_empty(ENV_SOCKET) {
        return vec![Candidate {
            path: PathBuf::from(path),
            named_by: "$SKYKIT_AGENT_SOCKET",
        }];
    }
    let mut candidates = Vec::new();
    if let Some(dir) = env.non_empty(ENV_XDG_RUNTIME_DIR) {
        candidates.push(Candidate {
            path: Path::new(&dir).join(USER_SOCKET_DIR).join(SOCKET_FILE),
            named_by: "$XDG_RUNTIME_DIR",
        });
    }
    candidates.push(Candidate {
        path: PathBuf::from(SYSTEM_SOCKET),
        named_by: "system default",
    });
    candidates
}

/// Connects to the agent's token service following the discovery rule.
pub async fn connect(
    explicit: Option<&Path>,
    env: &dyn Env,
) -> Result<TokenServiceClient<Channel>, Unreachable> {
    connect_channel(explicit, env)
        .await
        .map(TokenServiceClient::new)
}

/// A channel to the agent, for any of its services, following the rule.
pub async fn connect_channel(
    explicit: Option<&Path>,
    env: &dyn Env,
) -> Result<Channel, Unreachable> {
    let candidates = candidates(explicit, env);
    let named = candidates.len() == 1 && candidates[0].named_by != "system default";
    let mut attempts = Vec::new();
    for candidate in candidates {
        // Discovered paths are skipped when absent; a named one is tried.
        if !named && std::fs::symlink_metadata(&candidate.path).is_err() {
            attempts.push(Attempt {
                candidate,
                reason: "does not exist".to_owned(),
            });
            continue;
        }
        return match channel(&candidate.path).await {
            Ok(channel) => Ok(channel),
            Err(error) => {
                attempts.push(Attempt {
                    candidate,
                    reason: describe(&error),
                });
                Err(Unreachable { attempts })
            }
        };
    }
    Err(Unreachable { attempts })
}

/// Connects to the agent at `path`.
pub async fn connect_path(path: &Path) -> io::Result<TokenServiceClient<Channel>> {
    channel(path).await.map(TokenServiceClient::new)
}

/// A gRPC channel to the agent at `path`, for any of its services.
pub async fn channel(path: &Path) -> io::Result<Channel> {
    let stream = UnixStream::connect(path).await?;
    // The first connection is the one just made, so a failure to connect
    // is reported with its real cause; tonic reconnects by path later.
    let first = Arc::new(Mutex::new(Some(stream)));
    let path = path.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let first = first.clone();
        let path = path.clone();
        async move {
            let ready = first.lock().ok().and_then(|mut slot| slot.take());
            let stream = match ready {
                Some(stream) => stream,
                None => UnixStream::connect(&path).await?,
            };
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    // The authority must be a host name: HTTP/2 servers reject a path.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .map_err(io::Error::other)
}

fn describe(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => "does not exist".to_owned(),
        io::ErrorKind::ConnectionRefused => {
            "nothing is listening (a socket file left by an agent that stopped)".to_owned()
        }
        io::ErrorKind::PermissionDenied => format!(
            "permission denied for uid {}: ask the agent's operator for access to the socket",
            rustix::process::getuid().as_raw()
        ),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn paths(explicit: Option<&str>, pairs: &[(&str, &str)]) -> Vec<(String, &'static str)> {
        candidates(explicit.map(Path::new), &env(pairs))
            .into_iter()
            .map(|c| (c.path.display().to_string(), c.named_by))
            .collect()
    }

    /// The table every client library runs too.
    #[test]
    fn discovery_matches_the_shared_case_table() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/clients/testdata/socket-discovery.json"
        );
        let table: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = table["cases"].as_array().unwrap();
        assert!(cases.len() >= 5);
        for case in cases {
            let env: HashMap<String, String> = serde_json::from_value(case["env"].clone()).unwrap();
            let argument = case["argument"].as_str().map(Path::new);
            let actual: Vec<String> = candidates(argument, &env)
                .into_iter()
                .map(|candidate| candidate.path.display().to_string())
                .collect();
            let expected: Vec<String> = serde_json::from_value(case["candidates"].clone()).unwrap();
            assert_eq!(actual, expected, "case {}", case["name"]);
        }
    }

    #[test]
    fn discovery_follows_the_shared_rule() {
        let all = [
            ("SKYKIT_AGENT_SOCKET", "/e.sock"),
            ("XDG_RUNTIME_DIR", "/x"),
        ];
        assert_eq!(
            paths(Some("/a.sock"), &all),
            [("/a.sock".into(), "--socket")]
        );
        assert_eq!(
            paths(None, &all),
            [("/e.sock".into(), "$SKYKIT_AGENT_SOCKET")]
        );
        assert_eq!(
            paths(
                None,
                &[("XDG_RUNTIME_DIR", "/x"), ("SKYKIT_AGENT_SOCKET", "")]
            ),
            [
                ("/x/skykit-agent/agent.sock".into(), "$XDG_RUNTIME_DIR"),
                ("/run/skykit-agent/agent.sock".into(), "system default"),
            ]
        );
        assert_eq!(
            paths(None, &[]),
            [("/run/skykit-agent/agent.sock".into(), "system default")]
        );
    }
}
