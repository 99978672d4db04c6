//! Skykit API access tokens: RS256 JWTs carrying exactly `iss`, `iat` and
//! `exp`, byte-identical to what the vendor's python-jose example produces.
//!
//! Pure: no I/O, no clock (callers pass `iat`), no proto types.

use std::{fmt, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::key::{SignError, SigningKey};

/// The shortest lifetime a caller may ask for.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// Skykit API refuses tokens valid for longer than an hour.
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// The JWS header python-jose writes: `json.dumps` with sorted keys and no spaces.
const HEADER_JSON: &str = r#"{"alg":"RS256","typ":"JWT"}"#;

/// How long a token is valid (`exp - iat`): whole seconds within
/// [`MIN_LIFETIME`]..=[`MAX_LIFETIME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lifetime(u32);

/// A requested lifetime or `min_valid_for` outside what Skykit API accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "lifetime {0}s is over the maximum of 3600s (Skykit API accepts tokens valid for at most one hour)"
    )]
    LifetimeTooLong(i64),
    #[error("lifetime {0}s is under the minimum of 60s")]
    LifetimeTooShort(i64),
    #[error("min_valid_for {0}s is negative")]
    MinValidNegative(i64),
    #[error("min_valid_for {min_valid_for}s is longer than the token's lifetime {lifetime}s")]
    MinValidTooLong { min_valid_for: i64, lifetime: u32 },
}

impl Lifetime {
    /// The longest lifetime, also the default.
    pub const MAX: Lifetime = Lifetime(MAX_LIFETIME.as_secs() as u32);

    /// Checks a lifetime in seconds against the limits.
    pub fn from_secs(seconds: i64) -> Result<Self, LimitError> {
        if seconds > MAX_LIFETIME.as_secs() as i64 {
            Err(LimitError::LifetimeTooLong(seconds))
        } else if seconds < MIN_LIFETIME.as_secs() as i64 {
            Err(LimitError::LifetimeTooShort(seconds))
        } else {
            Ok(Lifetime(seconds as u32))
        }
    }

    /// The lifetime in seconds.
    pub fn secs(self) -> u32 {
        self.0
    }

    /// The lifetime as a [`Duration`].
    pub fn duration(self) -> Duration {
        Duration::from_secs(u64::from(self.0))
    }

    /// Checks that a token of this lifetime can stay valid for `seconds`.
    pub fn check_min_valid_for(self, seconds: i64) -> Result<Duration, LimitError> {
        if seconds < 0 {
            Err(LimitError::MinValidNegative(seconds))
        } else if seconds > i64::from(self.0) {
            Err(LimitError::MinValidTooLong {
                min_valid_for: seconds,
                lifetime: self.0,
            })
        } else {
            Ok(Duration::from_secs(seconds as u64))
        }
    }
}

impl fmt::Display for Lifetime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0)
    }
}

/// A signed token and the claims it carries.
///
/// Invariant: `jws` is never printed; `Debug` shows only the claims.
#[derive(Clone)]
pub struct Token {
    /// The JWS compact serialization, shared by every caller it is served to.
    pub jws: Arc<str>,
    pub issuer: Arc<str>,
    /// `iat`, seconds since the Unix epoch.
    pub issued_at: u64,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    pub key_id: Arc<str>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("jws", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl Token {
    /// The token's lifetime, `exp - iat`.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(self.issued_at))
    }
}

/// Signs a token for `issuer`, valid from `issued_at` for `lifetime`.
///
/// CPU-heavy (one RSA signature); run it off the async reactor.
pub fn issue(
    key: &SigningKey,
    issuer: &str,
    issued_at: u64,
    lifetime: Lifetime,
) -> Result<Token, SignError> {
    let expires_at = issued_at + u64::from(lifetime.secs());
    let mut jws = signing_input(issuer, issued_at, expires_at);
    let signature = key.sign(jws.as_bytes())?;
    jws.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut jws);
    Ok(Token {
        jws: jws.into(),
        issuer: issuer.into(),
        issued_at,
        expires_at,
        key_id: key.key_id().into(),
    })
}

/// `base64url(header) "." base64url(payload)`: the bytes RS256 signs.
pub fn signing_input(issuer: &str, issued_at: u64, expires_at: u64) -> String {
    let payload = payload_json(issuer, issued_at, expires_at);
    let mut input = String::with_capacity(64 + payload.len() * 4 / 3 + 700);
    URL_SAFE_NO_PAD.encode_string(HEADER_JSON, &mut input);
    input.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut input);
    input
}

/// The claims in the vendor example's order, as Python's `json.dumps(claims,
/// separators=(",", ":"))` writes them (so non-ASCII is `\uXXXX`-escaped).
pub fn payload_json(issuer: &str, issued_at: u64, expires_at: u64) -> String {
    let mut json = String::with_capacity(issuer.len() + 48);
    json.push_str(r#"{"iss":"#);
    push_python_json_string(&mut json, issuer);
    json.push_str(&format!(r#","iat":{issued_at},"exp":{expires_at}}}"#));
    json
}

/// Writes `text` as a JSON string the way Python's `json.dumps` does with
/// its default `ensure_ascii=True`.
fn push_python_json_string(out: &mut String, text: &str) {
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(character),
            _ => {
                let mut units = [0u16; 2];
                for unit in character.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// Signs a token and verifies it with the key's public half through
/// jsonwebtoken, so a key the crypto library loaded but cannot use for
/// RS256 is caught before the agent accepts calls.
pub fn self_test(key: &SigningKey, issuer: &str, now: u64) -> Result<(), SelfTestError> {
    let token = issue(
        key,
        issuer,
        now,
        Lifetime::from_secs(60).expect("60s is in range"),
    )
    .map_err(|_| SelfTestError::Sign)?;
    let (n, e) = key.public_jwk_components();
    let decoding_key = jsonwebtoken::DecodingKey::from_rsa_components(&n, &e)
        .map_err(|error| SelfTestError::Verify(error.to_string()))?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["iss", "iat", "exp"]);
    validation.set_issuer(&[issuer]);
    jsonwebtoken::decode::<serde_json::Value>(&*token.jws, &decoding_key, &validation)
        .map_err(|error| SelfTestError::Verify(error.to_string()))?;
    Ok(())
}

/// The startup self-test failed; the key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("the self-test could not sign a token")]
    Sign,
    #[error("the self-test token did not verify with the key's public half: {0}")]
    Verify(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Bits;

    fn check_payload(issuer: &str, expected: &str) {
        let actual = payload_json(issuer, 1_700_000_000, 1_700_003_600);
        assert_eq!(
            actual, expected,
            "\nexpected:\n{expected}\nactual:\n{actual}"
        );
    }

    #[test]
    fn payload_matches_python_json_dumps() {
        check_payload(
            "you@example.com",
            r#"{"iss":"you@example.com","iat":1700000000,"exp":1700003600}"#,
        );
        // Python escapes non-ASCII as UTF-16 units and keeps `/` as is.
        check_payload(
            "jürgen/ü@😀.de",
            r#"{"iss":"j\u00fcrgen/\u00fc@\ud83d\ude00.de","iat":1700000000,"exp":1700003600}"#,
        );
        check_payload(
            "a\"b\\c\n\u{1}",
            r#"{"iss":"a\"b\\c\n\u0001","iat":1700000000,"exp":1700003600}"#,
        );
    }

    #[test]
    fn issued_token_has_exact_header_and_claims_and_verifies() {
        let key = SigningKey::generate(Bits::Rsa2048).unwrap();
        let lifetime = Lifetime::from_secs(600).unwrap();
        let token = issue(&key, "you@example.com", 1_700_000_000, lifetime).unwrap();
        let parts: Vec<&str> = token.jws.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(parts[0]).unwrap(),
            HEADER_JSON.as_bytes()
        );
        assert_eq!(
            URL_SAFE_NO_PAD.decode(parts[1]).unwrap(),
            br#"{"iss":"you@example.com","iat":1700000000,"exp":1700000600}"#
        );
        assert_eq!(token.lifetime(), Duration::from_secs(600));
        assert_eq!(&*token.key_id, key.key_id());
        self_test(&key, "you@example.com", 1_700_000_000).unwrap();
    }

    #[test]
    fn debug_never_shows_the_jws() {
        let key = SigningKey::generate(Bits::Rsa2048).unwrap();
        let token = issue(&key, "you@example.com", 1, Lifetime::MAX).unwrap();
        let debug = format!("{token:?}");
        assert!(!debug.contains(&*token.jws));
        assert!(!debug.contains(token.jws.split('.').nth(2).unwrap()));
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn lifetime_limits_name_the_value_and_the_limit() {
        assert_eq!(Lifetime::from_secs(60).unwrap().secs(), 60);
        assert_eq!(Lifetime::from_secs(3600).unwrap(), Lifetime::MAX);
        let long = Lifetime::from_secs(3601).unwrap_err().to_string();
        assert!(long.contains("3601s") && long.contains("3600s"), "{long}");
        let short = Lifetime::from_secs(59).unwrap_err().to_string();
        assert!(short.contains("59s") && short.contains("60s"), "{short}");
        assert!(Lifetime::from_secs(-1).is_err());
        let lifetime = Lifetime::from_secs(600).unwrap();
        assert_eq!(
            lifetime.check_min_valid_for(600),
            Ok(Duration::from_secs(600))
        );
        let too_long = lifetime.check_min_valid_for(601).unwrap_err().to_string();
        assert!(
            too_long.contains("601s") && too_long.contains("600s"),
            "{too_long}"
        );
        assert!(lifetime.check_min_valid_for(-1).is_err());
    }
}
