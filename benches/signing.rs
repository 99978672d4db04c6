//! Micro-benchmarks of the two costs behind every token: one RS256
//! signature with the pre-parsed key (against `jsonwebtoken::encode` with a
//! PEM `EncodingKey`, the way an application signing for itself would), and
//! a cache hit. `cargo test --all-targets` runs each routine once as a test;
//! `cargo bench --bench signing` measures them (see BENCHMARKS.md).

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use skykit_agent::{
    cache::{self, Cache, SignFailure, Signer, SystemClock},
    key::{Bits, LoadOptions, SigningKey},
    peer::Peer,
    token::{self, Lifetime, Token},
};

const ISSUER: &str = "bench@example.com";
const ISSUED_AT: u64 = 1_700_000_000;

/// The claims the agent signs, in the vendor's order.
#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
    exp: u64,
}

/// A new 2048-bit key, loaded from its PEM file the way the agent loads
/// it, and the PEM text for jsonwebtoken.
fn keys() -> (SigningKey, Vec<u8>) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("private.pem");
    SigningKey::generate(Bits::Rsa2048)
        .expect("a new key")
        .write_private_pem(&path)
        .expect("the PEM written");
    let key = SigningKey::load(&path, LoadOptions::default()).expect("the PEM loaded");
    let pem = std::fs::read(&path).expect("the PEM read");
    (key, pem)
}

fn signing(c: &mut Criterion) {
    let (key, pem) = keys();
    let lifetime = Lifetime::MAX;
    let claims = Claims {
        iss: ISSUER,
        iat: ISSUED_AT,
        exp: ISSUED_AT + u64::from(lifetime.secs()),
    };
    let encoding_key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).expect("an RSA PEM");
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);

    let mut group = c.benchmark_group("rs256");
    group.bench_function("token::issue, pre-parsed key", |b| {
        b.iter(|| token::issue(&key, black_box(ISSUER), black_box(ISSUED_AT), lifetime))
    });
    group.bench_function("jsonwebtoken::encode, EncodingKey parsed once", |b| {
        b.iter(|| jsonwebtoken::encode(&header, black_box(&claims), &encoding_key))
    });
    group.bench_function("jsonwebtoken::encode, PEM parsed every time", |b| {
        b.iter(|| {
            let encoding_key = jsonwebtoken::EncodingKey::from_rsa_pem(black_box(&pem))?;
            jsonwebtoken::encode(&header, black_box(&claims), &encoding_key)
        })
    });
    group.finish();
}

/// Signs nothing: hands out a token with the requested claims at once.
struct FixedSigner {
    jws: Arc<str>,
}

impl Signer for FixedSigner {
    fn sign(
        &self,
        _identity: &str,
        lifetime: Lifetime,
        issued_at: u64,
    ) -> Result<Token, SignFailure> {
        Ok(Token {
            jws: self.jws.clone(),
            issuer: ISSUER.into(),
            issued_at,
            expires_at: issued_at + u64::from(lifetime.secs()),
            key_id: "bench".into(),
        })
    }
}

fn cache_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let cache = Cache::new(
        FixedSigner {
            jws: "a.b.c".repeat(90).into(),
        },
        SystemClock,
    );
    let key = cache::Key {
        identity: "default".into(),
        lifetime: Lifetime::MAX,
    };
    // The first request signs; every later one is a hit.
    let first = runtime
        .block_on(cache.get(&key, Duration::ZERO, Peer::UNKNOWN))
        .expect("a token");
    assert!(first.fresh, "the first request signs");

    c.bench_function("cache hit, lock-free path (Cache::cached)", |b| {
        b.iter(|| {
            cache
                .cached(
                    black_box("default"),
                    Lifetime::MAX,
                    Duration::ZERO,
                    |token, refresh_after| (token.jws.len(), refresh_after),
                )
                .expect("a cached token")
        })
    });
    c.bench_function("cache hit, locked path (Cache::get)", |b| {
        b.to_async(&runtime).iter(|| async {
            let issued = cache
                .get(black_box(&key), Duration::ZERO, Peer::UNKNOWN)
                .await
                .expect("a token");
            debug_assert!(!issued.fresh);
            issued
        })
    });
}

criterion_group!(benches, signing, cache_hit);
criterion_main!(benches);
