//! Property tests (issue 7, section 4): the key loader, the config parser
//! and the duration parser, fed arbitrary and adversarial input, never
//! panic and always answer with an error that says what is wrong.
//!
//! Each property runs 256 cases from a fixed seed, so a run is
//! deterministic; `PROPTEST_CASES=N` runs more, and `PROPTEST_RNG_SEED=N`
//! explores other inputs.

use std::{
    collections::HashMap,
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, RngSeed},
};
use skykit_agent::{
    config::{self, Context, Overrides, Problems},
    duration,
    key::{Bits, LoadOptions, SigningKey},
};
use tempfile::TempDir;

/// The seed unless `PROPTEST_RNG_SEED` names another.
const SEED: u64 = 0x5eed_7e57;

fn proptest_config() -> ProptestConfig {
    // `default()` reads PROPTEST_CASES (else 256) and PROPTEST_RNG_SEED.
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    // A failure prints its minimal input; with a fixed seed it reproduces,
    // so no regression files are written into the source tree.
    config.failure_persistence = None;
    config
}

// ---------------------------------------------------------------------
// The key loader
// ---------------------------------------------------------------------

/// A valid PKCS#8 RSA 2048 key (PEM), generated once per run.
fn generated_pem() -> &'static [u8] {
    static PEM: OnceLock<Vec<u8>> = OnceLock::new();
    PEM.get_or_init(|| {
        let dir = TempDir::new().expect("create a temp dir");
        let path = dir.path().join("private.pem");
        SigningKey::generate(Bits::Rsa2048)
            .expect("generate an RSA key")
            .write_private_pem(&path)
            .expect("write the key");
        fs::read(&path).expect("read the key back")
    })
}

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    fs::read(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

/// Keys to mutate: the generated PKCS#8 key, a PKCS#1 key, and fixtures
/// the loader refuses for other reasons (public, EC, encrypted).
fn seed_keys() -> &'static [Vec<u8>] {
    static KEYS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keys = vec![generated_pem().to_vec()];
        for name in [
            "rsa2048-pkcs1.pem",
            "rsa2048-public.pem",
            "ec-pkcs8.pem",
            "encrypted-pkcs1.pem",
        ] {
            keys.push(fixture(name));
        }
        keys
    })
}

/// One change to a valid key file.
#[derive(Debug, Clone)]
enum Mutation {
    /// Keep only the first `n` bytes (taken modulo the length).
    Truncate(usize),
    /// Flip bit `bit` of byte `at` of the PEM text.
    FlipText { at: usize, bit: u8 },
    /// Overwrite byte `at` of the text.
    SetText { at: usize, byte: u8 },
    /// Remove the bytes `at..at + len` of the text.
    Cut { at: usize, len: usize },
    /// Decode the base64 body, flip one bit of the DER, encode it again:
    /// the PEM stays well formed and the key structure is damaged.
    FlipDer { at: usize, bit: u8 },
    /// Decode, cut the DER to `n` bytes, encode again.
    TruncateDer(usize),
    /// Decode, overwrite a DER byte, encode again.
    SetDer { at: usize, byte: u8 },
    /// Append another of the keys (two blocks in one file).
    Append(usize),
    /// Replace every `\n` with `\r\n`.
    Crlf,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        at.prop_map(Mutation::Truncate),
        (at, 0u8..8).prop_map(|(at, bit)| Mutation::FlipText { at, bit }),
        (at, any::<u8>()).prop_map(|(at, byte)| Mutation::SetText { at, byte }),
        (at, 1usize..64).prop_map(|(at, len)| Mutation::Cut { at, len }),
        (at, 0u8..8).prop_map(|(at, bit)| Mutation::FlipDer { at, bit }),
        (at, 0u8..8).prop_map(|(at, bit)| Mutation::FlipDer { at: at % 32, bit }),
        at.prop_map(Mutation::TruncateDer),
        (at, any::<u8>()).prop_map(|(at, byte)| Mutation::SetDer { at, byte }),
        (0usize..32, any::<u8>()).prop_map(|(at, byte)| Mutation::SetDer { at, byte }),
        at.prop_map(Mutation::Append),
        Just(Mutation::Crlf),
    ]
}

/// The label and DER of a PEM text's first block (headers skipped).
fn split_pem(text: &[u8]) -> Option<(String, Vec<u8>)> {
    let text = std::str::from_utf8(text).ok()?;
    let begin = text.find("-----BEGIN ")?;
    let rest = &text[begin + "-----BEGIN ".len()..];
    let label_end = rest.find("-----")?;
    let label = rest[..label_end].to_owned();
    let after_label = &rest[label_end + "-----".len()..];
    let body_end = after_label.find("-----END ")?;
    let body: String = after_label[..body_end]
        .lines()
        .filter(|line| !line.contains(':'))
        .collect();
    Some((label, STANDARD.decode(body.trim()).ok()?))
}

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in STANDARD.encode(der).as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text.into_bytes()
}

fn mutate(original: &[u8], mutation: &Mutation) -> Vec<u8> {
    let mut bytes = original.to_vec();
    let len = bytes.len().max(1);
    let der = |change: &dyn Fn(&mut Vec<u8>)| match split_pem(original) {
        Some((label, mut der)) if !der.is_empty() => {
            change(&mut der);
            pem(&label, &der)
        }
        _ => original.to_vec(),
    };
    match *mutation {
        Mutation::Truncate(n) => {
            bytes.truncate(n % len);
            bytes
        }
        Mutation::FlipText { at, bit } => {
            if let Some(byte) = bytes.get_mut(at % len) {
                *byte ^= 1 << bit;
            }
            bytes
        }
        Mutation::SetText { at, byte } => {
            if let Some(slot) = bytes.get_mut(at % len) {
                *slot = byte;
            }
            bytes
        }
        Mutation::Cut { at, len: cut } => {
            let start = at % len;
            let end = (start + cut).min(bytes.len());
            bytes.drain(start.min(end)..end);
            bytes
        }
        Mutation::FlipDer { at, bit } => der(&|der| {
            let at = at % der.len();
            der[at] ^= 1 << bit;
        }),
        Mutation::TruncateDer(n) => der(&|der| {
            let keep = n % der.len();
            der.truncate(keep);
        }),
        Mutation::SetDer { at, byte } => der(&|der| {
            let at = at % der.len();
            der[at] = byte;
        }),
        Mutation::Append(other) => {
            let keys = seed_keys();
            bytes.extend_from_slice(&keys[other % keys.len()]);
            bytes
        }
        Mutation::Crlf => String::from_utf8_lossy(&bytes)
            .replace('\n', "\r\n")
            .into_bytes(),
    }
}

/// PEM-ish text: BEGIN and END lines with assorted labels, headers, base64
/// noise, pieces of a real key and assorted line ends, in any order.
fn pem_fragment() -> impl Strategy<Value = String> {
    let label = prop_oneof![
        Just("PRIVATE KEY".to_owned()),
        Just("RSA PRIVATE KEY".to_owned()),
        Just("ENCRYPTED PRIVATE KEY".to_owned()),
        Just("EC PRIVATE KEY".to_owned()),
        Just("OPENSSH PRIVATE KEY".to_owned()),
        Just("PUBLIC KEY".to_owned()),
        Just("RSA PUBLIC KEY".to_owned()),
        Just("CERTIFICATE".to_owned()),
        "[A-Z ]{0,24}",
        ".{0,12}",
    ];
    let real_line = any::<usize>().prop_map(|index| {
        let text = String::from_utf8_lossy(generated_pem()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[index % lines.len()].to_owned()
    });
    prop_oneof![
        label
            .clone()
            .prop_map(|label| format!("-----BEGIN {label}-----")),
        label.prop_map(|label| format!("-----END {label}-----")),
        Just("Proc-Type: 4,ENCRYPTED".to_owned()),
        Just("DEK-Info: AES-128-CBC,0123456789ABCDEF0123456789ABCDEF".to_owned()),
        "[A-Za-z-]{1,12}: [ -~]{0,30}",
        "[A-Za-z0-9+/]{0,80}={0,3}",
        prop::collection::vec(any::<u8>(), 0..96).prop_map(|bytes| STANDARD.encode(bytes)),
        real_line,
        Just("\n".to_owned()),
        Just("\r\n".to_owned()),
        Just("\r".to_owned()),
        Just(" ".to_owned()),
        Just("\t".to_owned()),
        Just("-----".to_owned()),
        Just("\0".to_owned()),
        ".{0,8}",
    ]
}

fn pem_ish() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(pem_fragment(), 0..24).prop_map(|parts| parts.concat().into_bytes())
}

/// Writes `contents` to a new file of exactly `mode` and loads it.
fn load_key(
    contents: &[u8],
    mode: u32,
    options: LoadOptions,
) -> (PathBuf, Result<SigningKey, String>, TempDir) {
    let dir = TempDir::new().expect("create a temp dir");
    let path = dir.path().join("private.pem");
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .expect("create the key file");
    file.write_all(contents).expect("write the key file");
    drop(file);
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod the key file");
    let result = SigningKey::load(&path, options).map_err(|error| error.to_string());
    (path, result, dir)
}

/// The loader's contract: an `Err` has a message that names the file.
fn check_key(contents: &[u8], mode: u32, options: LoadOptions) -> Result<(), TestCaseError> {
    let (path, result, _dir) = load_key(contents, mode, options);
    if let Err(message) = result {
        let named = path.display().to_string();
        prop_assert!(
            !message.trim().is_empty() && message.contains(&named),
            "the error does not name {named}: {message:?}"
        );
    }
    Ok(())
}

fn load_options() -> impl Strategy<Value = LoadOptions> {
    (any::<bool>(), any::<bool>()).prop_map(|(insecure, locked)| LoadOptions {
        allow_insecure_permissions: insecure,
        require_locked_memory: locked,
    })
}

fn key_mode() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => Just(0o600),
        1 => Just(0o400),
        1 => Just(0o640),
        1 => Just(0o644),
        1 => Just(0o000),
    ]
}

#[test]
fn the_generated_and_pkcs1_keys_load_unchanged() {
    for contents in [generated_pem().to_vec(), fixture("rsa2048-pkcs1.pem")] {
        let (path, result, _dir) = load_key(&contents, 0o600, LoadOptions::default());
        if let Err(message) = result {
            panic!("{} does not load: {message}", path.display());
        }
    }
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn the_key_loader_refuses_arbitrary_bytes_with_a_message_naming_the_file(
        contents in prop::collection::vec(any::<u8>(), 0..4096),
        mode in key_mode(),
        options in load_options(),
    ) {
        check_key(&contents, mode, options)?;
    }

    #[test]
    fn the_key_loader_refuses_pem_ish_text_with_a_message_naming_the_file(
        contents in pem_ish(),
        options in load_options(),
    ) {
        check_key(&contents, 0o600, options)?;
    }

    #[test]
    fn the_key_loader_survives_truncated_and_bit_flipped_keys(
        key in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..4),
        options in load_options(),
    ) {
        let keys = seed_keys();
        let mut contents = keys[key % keys.len()].clone();
        for mutation in &mutations {
            contents = mutate(&contents, mutation);
        }
        check_key(&contents, 0o600, options)?;
    }
}

// ---------------------------------------------------------------------
// The config parser
// ---------------------------------------------------------------------

/// A TOML value, written out by [`Value::render`].
#[derive(Debug, Clone)]
enum Value {
    Str(String),
    /// Integers as written, including forms TOML allows (`0x1F`, `1_000`).
    Int(String),
    Float(&'static str),
    Bool(bool),
    Date(&'static str),
    Array(Vec<Value>),
    Table(Vec<(String, Value)>),
}

impl Value {
    fn render(&self) -> String {
        match self {
            Value::Str(text) => quote(text),
            Value::Int(text) => text.clone(),
            Value::Float(text) | Value::Date(text) => (*text).to_owned(),
            Value::Bool(value) => value.to_string(),
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(Value::render).collect();
                format!("[{}]", items.join(", "))
            }
            Value::Table(pairs) => {
                let pairs: Vec<String> = pairs
                    .iter()
                    .map(|(key, value)| format!("{} = {}", bare_or_quoted(key), value.render()))
                    .collect();
                format!("{{{}}}", pairs.join(", "))
            }
        }
    }
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn bare_or_quoted(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare { key.to_owned() } else { quote(key) }
}

/// Strings a config might hold: durations, modes, emails, names, paths,
/// real users and groups, and anything at all.
fn string_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{0,11}[smhd]?([0-9]{1,3}[smh])?",
        " ?[0-9]{1,4}[smh] ?",
        "[0-7]{0,5}",
        "[a-z]{1,8}@[a-z]{1,8}\\.com",
        "[a-z][a-z0-9_-]{0,10}",
        "/?[a-z./]{0,20}",
        prop::sample::select(vec![
            "root", "nobody", "daemon", "nogroup", "0", "65534", ""
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

fn int_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (-5i64..5).prop_map(|n| n.to_string()),
        (0i64..100_000).prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "4294967295",
            "4294967296",
            "0x1F",
            "0o17",
            "0b101",
            "1_000",
            "+5",
            "-0",
        ])
        .prop_map(str::to_owned),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        4 => string_value().prop_map(Value::Str),
        3 => int_value().prop_map(Value::Int),
        1 => prop::sample::select(vec!["1.5", "-0.0", "1e3", "inf", "nan", "-inf"])
            .prop_map(Value::Float),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => prop::sample::select(vec!["1979-05-27T07:32:00Z", "1979-05-27", "07:32:00"])
            .prop_map(Value::Date),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((unknown_key(), inner), 0..3).prop_map(Value::Table),
        ]
    })
}

/// A key no section knows.
fn unknown_key() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z_]{1,12}", ".{0,6}"]
}

const TOP_LEVEL: &[&str] = &[
    "socket",
    "socket_mode",
    "socket_group",
    "require_locked_memory",
    "limits",
    "identity",
];
const LIMITS: &[&str] = &[
    "max_message_bytes",
    "max_concurrent_streams",
    "max_calls_per_connection",
    "request_timeout",
    "keepalive_interval",
    "keepalive_timeout",
    "max_header_list_bytes",
    "max_connections",
    "handshake_timeout",
    "new_signatures_per_uid_per_minute",
    "drain_timeout",
];
const IDENTITY: &[&str] = &[
    "name",
    "issuer",
    "key",
    "key_credential",
    "lifetime",
    "default",
    "allow_insecure_key_permissions",
    "allow_uids",
    "allow_gids",
    "allow_users",
    "allow_groups",
];

/// A value of the type `key` expects, mostly within its valid range.
fn typed_value(key: &str) -> BoxedStrategy<Value> {
    let names =
        || prop::sample::select(vec!["root", "nobody", "daemon", "nogroup", "no-such-name"]);
    match key {
        "socket" | "key" => "[a-z]{1,8}(/[a-z]{1,8})?\\.(sock|pem)"
            .prop_map(Value::Str)
            .boxed(),
        "socket_mode" => prop_oneof!["0?[0-7]{3}", "[0-9]{1,5}"]
            .prop_map(Value::Str)
            .boxed(),
        "socket_group" => prop_oneof![names().prop_map(str::to_owned), "[0-9]{1,6}"]
            .prop_map(Value::Str)
            .boxed(),
        "require_locked_memory" | "default" | "allow_insecure_key_permissions" => {
            any::<bool>().prop_map(Value::Bool).boxed()
        }
        "request_timeout" | "keepalive_interval" | "keepalive_timeout" | "handshake_timeout"
        | "drain_timeout" => prop_oneof!["[1-9][0-9]?[smh]", "0s", "[0-9]{1,3}"]
            .prop_map(Value::Str)
            .boxed(),
        key if LIMITS.contains(&key) => prop_oneof![
            4 => (1i64..100_000).prop_map(|n| Value::Int(n.to_string())),
            1 => int_value().prop_map(Value::Int),
        ]
        .boxed(),
        "name" => prop_oneof![4 => "[a-z][a-z0-9_-]{0,6}|default|api", 1 => ".{0,3}"]
            .prop_map(Value::Str)
            .boxed(),
        "issuer" => prop_oneof![4 => "[a-z]{1,6}@example\\.com", 1 => "[a-z@.]{0,6}"]
            .prop_map(Value::Str)
            .boxed(),
        "key_credential" => "[a-z.]{0,8}|\\.\\.|a/b".prop_map(Value::Str).boxed(),
        "lifetime" => prop_oneof!["[0-9]{1,4}[smh]", Just("1h".to_owned())]
            .prop_map(Value::Str)
            .boxed(),
        "allow_uids" | "allow_gids" => prop::collection::vec(
            prop_oneof![
                4 => (0u32..70_000).prop_map(|n| Value::Int(n.to_string())),
                1 => int_value().prop_map(Value::Int),
            ],
            0..3,
        )
        .prop_map(Value::Array)
        .boxed(),
        "allow_users" | "allow_groups" => {
            prop::collection::vec(names().prop_map(|name| Value::Str(name.to_owned())), 0..3)
                .prop_map(Value::Array)
                .boxed()
        }
        _ => value().boxed(),
    }
}

/// Pairs for a section: mostly its own keys with values of the right
/// type, some of its keys with values of any type, and unknown keys. A key
/// appears once (a repeated key is a TOML syntax error, which the
/// arbitrary-text properties cover).
fn pairs(
    known: &'static [&'static str],
    max: usize,
) -> impl Strategy<Value = Vec<(String, Value)>> {
    let pair = prop_oneof![
        6 => prop::sample::select(known)
            .prop_flat_map(|key| typed_value(key).prop_map(move |value| (key.to_owned(), value))),
        2 => (prop::sample::select(known).prop_map(str::to_owned), value()),
        1 => (unknown_key(), value()),
    ];
    prop::collection::vec(pair, 0..max).prop_map(|pairs| {
        let mut seen = std::collections::HashSet::new();
        pairs
            .into_iter()
            .filter(|(key, _)| seen.insert(key.clone()))
            .collect()
    })
}

/// A structured config document: top-level pairs, an optional `[limits]`
/// table and `[[identity]]` sections, and a choice of line end.
#[derive(Debug, Clone)]
struct Document {
    top: Vec<(String, Value)>,
    limits: Option<Vec<(String, Value)>>,
    identities: Vec<Vec<(String, Value)>>,
    crlf: bool,
}

impl Document {
    fn render(&self) -> String {
        let end = if self.crlf { "\r\n" } else { "\n" };
        let mut text = String::new();
        let pairs = |text: &mut String, pairs: &[(String, Value)]| {
            for (key, value) in pairs {
                text.push_str(&format!(
                    "{} = {}{end}",
                    bare_or_quoted(key),
                    value.render()
                ));
            }
        };
        pairs(&mut text, &self.top);
        if let Some(limits) = &self.limits {
            text.push_str(&format!("[limits]{end}"));
            pairs(&mut text, limits);
        }
        for identity in &self.identities {
            text.push_str(&format!("{end}[[identity]]{end}"));
            pairs(&mut text, identity);
        }
        text
    }
}

/// An identity: usually a name and an issuer (so that documents reach the
/// checks across identities: duplicate names, defaults), then anything.
fn identity_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    (
        prop::option::weighted(0.9, typed_value("name")),
        prop::option::weighted(0.9, typed_value("issuer")),
        prop::option::of(any::<bool>()),
        pairs(IDENTITY, 4),
    )
        .prop_map(|(name, issuer, default, extra)| {
            let mut fields = Vec::new();
            let mut push = |key: &str, value: Option<Value>| {
                if let Some(value) = value {
                    fields.push((key.to_owned(), value));
                }
            };
            push("name", name);
            push("issuer", issuer);
            push("default", default.map(Value::Bool));
            fields.extend(
                extra
                    .into_iter()
                    .filter(|(key, _)| !["name", "issuer", "default"].contains(&key.as_str())),
            );
            fields
        })
}

fn document() -> impl Strategy<Value = Document> {
    (
        pairs(TOP_LEVEL, 4),
        prop::option::of(pairs(LIMITS, 6)),
        prop::collection::vec(identity_fields(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(top, limits, identities, crlf)| Document {
            // `limits` and `identity` are written as sections below.
            top: top
                .into_iter()
                .filter(|(key, _)| key != "limits" || limits.is_none())
                .filter(|(key, _)| key != "identity" || identities.is_empty())
                .collect(),
            limits,
            identities,
            crlf,
        })
}

/// TOML-ish text built from fragments of TOML syntax and config keys.
fn toml_ish() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        prop::sample::select(TOP_LEVEL).prop_map(str::to_owned),
        prop::sample::select(LIMITS).prop_map(str::to_owned),
        prop::sample::select(IDENTITY).prop_map(str::to_owned),
        prop::sample::select(vec![
            "[limits]",
            "[[identity]]",
            "[identity]",
            "[[limits]]",
            "[",
            "]",
            "[[",
            "]]",
            "=",
            " = ",
            "\"",
            "'",
            "\"\"\"",
            "'''",
            "{",
            "}",
            ",",
            ".",
            "#",
            "\n",
            "\r\n",
            "\r",
            " ",
            "\t",
            "\\",
            "\\u",
            "true",
            "false",
            "inf",
            "nan",
            "0x",
            "1_",
            "-",
            "+",
            "1979-05-27T07:32:00Z",
            "\u{feff}",
            "\0",
        ])
        .prop_map(str::to_owned),
        "[0-9]{1,12}",
        "[a-z]{1,8}",
        ".{0,6}",
    ];
    prop::collection::vec(fragment, 0..40).prop_map(|parts| parts.concat())
}

/// The environment a config load might see.
fn env() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let variable = prop::sample::select(vec![
        "SKYKIT_AGENT_SOCKET",
        "XDG_RUNTIME_DIR",
        "RUNTIME_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
    ]);
    prop::collection::vec(
        (
            variable,
            prop_oneof!["/[a-z]{1,8}(/[a-z]{1,8})?", "/a:/b", Just(String::new())],
        ),
        0..4,
    )
}

#[derive(Debug, Clone)]
struct Flags {
    euid: u32,
    issuer: Option<String>,
    key: bool,
    socket: bool,
    /// Name the file by `$SKYKIT_AGENT_CONFIG` instead of `--config`.
    config_by_env: bool,
}

fn flags() -> impl Strategy<Value = Flags> {
    (
        prop::sample::select(vec![0u32, 1000, 65534]),
        prop::option::of(prop_oneof![Just("you@example.com".to_owned()), ".{0,8}"]),
        any::<bool>(),
        prop::bool::weighted(0.75),
        any::<bool>(),
    )
        .prop_map(|(euid, issuer, key, socket, config_by_env)| Flags {
            euid,
            issuer,
            key,
            socket,
            config_by_env,
        })
}

/// Loads `text` as the config file; the contract: an `Err` is a non-empty
/// list of non-empty problems, and an `Ok` has exactly one default identity.
fn check_config(
    text: &str,
    env_vars: &[(&'static str, String)],
    flags: &Flags,
) -> Result<(), TestCaseError> {
    let dir = TempDir::new().expect("create a temp dir");
    let file = dir.path().join("config.toml");
    fs::write(&file, text).expect("write the config");
    let mut env: HashMap<String, String> = env_vars
        .iter()
        .map(|(name, value)| ((*name).to_owned(), value.clone()))
        .collect();
    let mut overrides = Overrides {
        issuer: flags.issuer.clone(),
        key: flags.key.then(|| dir.path().join("flag.pem")),
        socket: flags.socket.then(|| dir.path().join("flag.sock")),
        ..Overrides::default()
    };
    if flags.config_by_env {
        env.insert(config::ENV_CONFIG.to_owned(), file.display().to_string());
    } else {
        overrides.config = Some(file);
    }
    let context = Context {
        euid: flags.euid,
        config_dir: dir.path().to_owned(),
    };
    match config::load(&overrides, &env, &context) {
        Ok(config) => {
            let defaults = config
                .identities
                .iter()
                .filter(|identity| identity.default)
                .count();
            prop_assert_eq!(
                defaults,
                1,
                "an accepted config has exactly one default identity: {:?}",
                config
            );
        }
        Err(Problems(problems)) => {
            prop_assert!(!problems.is_empty(), "an error with no problem listed");
            for problem in &problems {
                prop_assert!(
                    !problem.trim().is_empty(),
                    "an empty problem in {:?}",
                    problems
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn the_config_parser_answers_arbitrary_text_with_problems(
        text in any::<String>(),
        env in env(),
        flags in flags(),
    ) {
        check_config(&text, &env, &flags)?;
    }

    #[test]
    fn the_config_parser_answers_toml_ish_text_with_problems(
        text in toml_ish(),
        env in env(),
        flags in flags(),
    ) {
        check_config(&text, &env, &flags)?;
    }

    #[test]
    fn the_config_parser_answers_structured_documents_with_problems(
        document in document(),
        env in env(),
        flags in flags(),
    ) {
        check_config(&document.render(), &env, &flags)?;
    }
}

// ---------------------------------------------------------------------
// The duration parser
// ---------------------------------------------------------------------

const UNITS: [(char, u64); 3] = [('s', 1), ('m', 60), ('h', 3600)];

/// Terms of a well-formed duration: a number of at most 9 digits and a
/// unit, in any order and with repeats.
fn terms() -> impl Strategy<Value = Vec<(u64, usize)>> {
    prop::collection::vec(
        (prop_oneof![0u64..100, 0u64..1_000_000_000], 0..UNITS.len()),
        1..6,
    )
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn the_duration_parser_answers_any_string(
        text in prop_oneof![any::<String>(), "[0-9smhd .+-]{0,16}", "[0-9]{8,12}[smh]"],
    ) {
        match duration::parse(&text) {
            Ok(_) => {}
            Err(error) => {
                let message = error.to_string();
                prop_assert!(
                    message.starts_with("invalid duration") && message.contains(&format!("{text:?}")),
                    "the message quotes the input: {}",
                    message
                );
            }
        }
    }

    #[test]
    fn a_well_formed_duration_is_the_sum_of_its_terms(
        terms in terms(),
        before in "[ \t]{0,2}",
        after in "[ \t\n]{0,2}",
    ) {
        let body: String = terms
            .iter()
            .map(|&(number, unit)| format!("{number}{}", UNITS[unit].0))
            .collect();
        let text = format!("{before}{body}{after}");
        let expected: u64 = terms.iter().map(|&(number, unit)| number * UNITS[unit].1).sum();
        prop_assert_eq!(duration::parse(&text), Ok(Duration::from_secs(expected)), "{:?}", text);
    }

    #[test]
    fn format_then_parse_round_trips_whole_seconds(
        seconds in prop_oneof![0u64..7200, 0u64..1_000_000_000, (0u64..277_778).prop_map(|h| h * 3600)],
    ) {
        let duration = Duration::from_secs(seconds);
        let text = duration::format(duration);
        prop_assert_eq!(duration::parse(&text), Ok(duration), "{:?}", text);
    }
}
