//! The identities the agent signs for, each with its loaded key, held in a
//! [`Registry`] whose contents can be replaced at runtime (reload, rotation)
//! while requests keep flowing.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;

use crate::{
    cache::{SignFailure, Signer},
    config::{Config, IdentityConfig},
    key::{self, LoadOptions, SigningKey},
    policy::Policy,
    token::{self, Lifetime, Token},
};

/// One identity: who the tokens say they are from, and the key that signs.
#[derive(Debug)]
pub struct Identity {
    pub name: Arc<str>,
    pub issuer: Arc<str>,
    pub key: Arc<SigningKey>,
    /// The lifetime a request without one gets.
    pub lifetime: Lifetime,
    /// Who may use it.
    pub policy: Policy,
    /// Its `tokens_issued` counters, resolved once so the hot path only
    /// increments an atomic.
    pub issued_cached: prometheus_client::metrics::counter::Counter,
    pub issued_fresh: prometheus_client::metrics::counter::Counter,
}

/// The full set of identities, loaded and self-tested.
///
/// Invariant: not empty, and `default` indexes `list`.
#[derive(Debug)]
pub struct Identities {
    list: Vec<Arc<Identity>>,
    default: usize,
}

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("identity {name:?}: {source}")]
    Key {
        name: String,
        #[source]
        source: key::Error,
    },
    #[error("identity {name:?}: key {}: {source}", path.display())]
    SelfTest {
        name: String,
        path: std::path::PathBuf,
        #[source]
        source: token::SelfTestError,
    },
}

impl Identities {
    /// Loads every identity's key and proves it can sign a verifiable token.
    /// All failures are returned together.
    pub fn load(config: &Config) -> Result<Self, Vec<Error>> {
        let mut list = Vec::new();
        let mut errors = Vec::new();
        for identity in &config.identities {
            match load_one(identity, config.require_locked_memory) {
                Ok(loaded) => list.push(Arc::new(loaded)),
                Err(error) => errors.push(error),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let default_name = &config.default_identity().name;
        let default = list
            .iter()
            .position(|identity| &*identity.name == default_name)
            .unwrap_or(0);
        Ok(Identities { list, default })
    }

    /// The identity a request names; the default one for an empty name.
    pub fn resolve(&self, name: &str) -> Option<&Arc<Identity>> {
        if name.is_empty() {
            return self.list.get(self.default);
        }
        self.list.iter().find(|identity| &*identity.name == name)
    }

    /// All identities, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Identity>> {
        self.list.iter()
    }

    /// The names, for messages such as "unknown identity".
    pub fn names(&self) -> Vec<&str> {
        self.list.iter().map(|identity| &*identity.name).collect()
    }
}

fn load_one(config: &IdentityConfig, require_locked_memory: bool) -> Result<Identity, Error> {
    let options = LoadOptions {
        allow_insecure_permissions: config.allow_insecure_key_permissions
            || config.key_is_credential,
        require_locked_memory,
    };
    let key = SigningKey::load(&config.key, options).map_err(|source| Error::Key {
        name: config.name.clone(),
        source,
    })?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    token::self_test(&key, &config.issuer, now).map_err(|source| Error::SelfTest {
        name: config.name.clone(),
        path: config.key.clone(),
        source,
    })?;
    Ok(Identity {
        name: config.name.as_str().into(),
        issuer: config.issuer.as_str().into(),
        key: Arc::new(key),
        lifetime: config.lifetime,
        policy: config.policy.clone(),
        issued_cached: issued_counter(&config.name, "cached"),
        issued_fresh: issued_counter(&config.name, "fresh"),
    })
}

fn issued_counter(
    identity: &str,
    source: &'static str,
) -> prometheus_client::metrics::counter::Counter {
    crate::metrics::global()
        .tokens_issued
        .get_or_create(&crate::metrics::IssuedLabels {
            identity: crate::metrics::Name(identity.into()),
            source,
        })
        .clone()
}

/// The live identities, shared by the server and the cache's signer.
#[derive(Debug)]
pub struct Registry {
    // Read on every call by every thread, written on reload: an atomic
    // pointer, so readers take no lock (and `peek` no reference count).
    current: ArcSwap<Identities>,
}

impl Registry {
    pub fn new(identities: Identities) -> Self {
        Registry {
            current: ArcSwap::from_pointee(identities),
        }
    }

    /// A snapshot; requests use one snapshot from start to end.
    pub fn current(&self) -> Arc<Identities> {
        self.current.load_full()
    }

    /// A snapshot for a moment: cheaper than [`Registry::current`], but not
    /// to be held across an `.await` or for long.
    pub fn peek(&self) -> arc_swap::Guard<Arc<Identities>> {
        self.current.load()
    }

    /// Swaps in a new set of identities at once.
    pub fn replace(&self, identities: Identities) {
        self.current.store(Arc::new(identities));
    }
}

impl Signer for Registry {
    fn sign(&self, name: &str, lifetime: Lifetime, issued_at: u64) -> Result<Token, SignFailure> {
        let identities = self.current();
        let identity = identities
            .resolve(name)
            .ok_or_else(|| SignFailure(format!("identity {name:?} no longer exists").into()))?;
        token::issue(&identity.key, &identity.issuer, issued_at, lifetime)
            .map_err(|error| SignFailure(error.to_string().into()))
    }
}
