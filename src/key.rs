//! The signing key. Raw key bytes are read, decoded and held only here, in
//! buffers that are zeroized on drop; the rest of the agent sees a
//! [`SigningKey`] that can sign RS256 and report its fingerprint (`key_id`).

use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use aws_lc_rs::{
    encoding::{AsDer, Pkcs8V1Der},
    rand::SystemRandom,
    rsa::{KeyPair, KeySize},
    signature::{KeyPair as _, RSA_PKCS1_SHA256},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use zeroize::Zeroizing;

use crate::memory::LockedBuf;

/// The smallest RSA modulus the agent accepts, in bits.
pub const MIN_BITS: usize = 2048;
/// The largest RSA modulus the agent accepts, in bits.
pub const MAX_BITS: usize = 8192;
/// A key file larger than this is not a key; refusing it early bounds memory.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// An RSA private key, parsed once, that signs RS256.
///
/// Invariant: the parsed key lives inside aws-lc, which wipes it when freed;
/// the PEM text it was read from was zeroized when loading ended, and its
/// DER stays in locked pages for as long as the key lives (so the key's
/// raw bytes never reach swap and `VmLck` shows the protection in force).
pub struct SigningKey {
    pair: KeyPair,
    key_id: String,
    bits: usize,
    /// The DER of a loaded key, in locked, undumpable pages; `None` for a
    /// key generated in this process (it lives only inside aws-lc).
    _locked_der: Option<LockedBuf>,
}

/// Why a key file was refused. Every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "signing key {} does not exist: create one with `skykit-agent keygen`, or point --key (or `key` in the config) at your private.pem",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("cannot read signing key {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "signing key {} is empty: point --key (or `key` in the config) at your private.pem",
        path.display()
    )]
    Empty { path: PathBuf },
    #[error(
        "signing key {} is larger than 1 MiB, so it is not a PEM private key: point --key (or `key`) at your private.pem",
        path.display()
    )]
    TooLarge { path: PathBuf },
    #[error(
        "signing key {} is not PEM: expected a `-----BEGIN PRIVATE KEY-----` or `-----BEGIN RSA PRIVATE KEY-----` block as written by `openssl genrsa` or `skykit-agent keygen`",
        path.display()
    )]
    NotPem { path: PathBuf },
    #[error(
        "signing key {} holds {found} (`BEGIN {label}`), not a private key: point --key (or `key`) at the private key (private.pem), not at public.pem or a certificate",
        path.display()
    )]
    NotPrivate {
        path: PathBuf,
        found: &'static str,
        label: String,
    },
    #[error(
        "signing key {} is encrypted with a passphrase, which the agent cannot prompt for: decrypt it once with `openssl pkey -in {} -out private.pem` and protect the new file with `chmod 600` instead",
        path.display(), path.display()
    )]
    Encrypted { path: PathBuf },
    #[error(
        "signing key {} is {kind}, but Skykit API needs an RSA key for RS256: create one with `skykit-agent keygen` and register its public key",
        path.display()
    )]
    NotRsa { path: PathBuf, kind: String },
    #[error(
        "signing key {} is an OpenSSH-format key (`BEGIN OPENSSH PRIVATE KEY`), which the agent does not read: convert an RSA key with `ssh-keygen -p -m PKCS8 -f {}`, or create a new key with `skykit-agent keygen`",
        path.display(), path.display()
    )]
    OpenSsh { path: PathBuf },
    #[error(
        "signing key {} is a {bits}-bit RSA key; the agent accepts {MIN_BITS} to {MAX_BITS} bits: create a new key with `skykit-agent keygen` and register its public key",
        path.display()
    )]
    Size { path: PathBuf, bits: usize },
    #[error(
        "signing key {} holds {count} private keys; the agent needs exactly one: keep one key per file",
        path.display()
    )]
    SeveralKeys { path: PathBuf, count: usize },
    #[error(
        "signing key {} has mode {mode:04o}, so other users may read it: run `chmod 600 {}` (or set allow_insecure_key_permissions = true for this identity)",
        path.display(), path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("signing key {} is damaged ({reason}): restore it from a backup or create a new key with `skykit-agent keygen`", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "cannot lock the memory for signing key {} in RAM, and require_locked_memory = true: raise the locked-memory limit (LimitMEMLOCK= in the unit, `ulimit -l` in a shell) or set require_locked_memory = false",
        path.display()
    )]
    Unlockable { path: PathBuf },
}

/// Signing failed inside the crypto library; it carries no key material.
#[derive(Debug, Clone, thiserror::Error)]
#[error("RSA signing failed in the crypto library")]
pub struct SignError;

/// How strictly [`SigningKey::load`] checks the file's permissions.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Accept a key file of our own uid that group or others may read.
    pub allow_insecure_permissions: bool,
    /// Refuse to load the key unless its bytes can be locked in RAM.
    pub require_locked_memory: bool,
}

/// Key sizes `keygen` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bits {
    #[value(name = "2048")]
    Rsa2048,
    #[value(name = "3072")]
    Rsa3072,
    #[value(name = "4096")]
    Rsa4096,
}

impl SigningKey {
    /// Loads a PEM private key (PKCS#8 or PKCS#1), refusing anything else
    /// with an [`Error`] that names the file and what to do.
    pub fn load(path: &Path, options: LoadOptions) -> Result<Self, Error> {
        let contents = read_key_file(path, options)?;
        let der = decode_private_key_pem(path, &contents, options)?;
        drop(contents);
        Self::from_der(path, der)
    }

    /// Makes a new random key.
    pub fn generate(bits: Bits) -> Result<Self, SignError> {
        let size = match bits {
            Bits::Rsa2048 => KeySize::Rsa2048,
            Bits::Rsa3072 => KeySize::Rsa3072,
            Bits::Rsa4096 => KeySize::Rsa4096,
        };
        let pair = KeyPair::generate(size).map_err(|_| SignError)?;
        Self::from_pair(pair).ok_or(SignError)
    }

    /// The fingerprint: unpadded base64url SHA-256 of the RFC 7638 JWK.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Signs `message` with RSASSA-PKCS1-v1_5 SHA-256 (JWS `RS256`).
    ///
    /// This is CPU-heavy (about a millisecond for 2048 bits): callers on an
    /// async runtime run it on a blocking thread.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message,
                &mut signature,
            )
            .map_err(|_| SignError)?;
        Ok(signature)
    }

    /// The public key as SubjectPublicKeyInfo DER (`BEGIN PUBLIC KEY`).
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pair
            .public_key()
            .as_der()
            .map(|der| der.as_ref().to_vec())
            .unwrap_or_default()
    }

    /// The public key as PEM (`BEGIN PUBLIC KEY`), for registration.
    pub fn public_key_pem(&self) -> String {
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in STANDARD.encode(self.public_key_der()).as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// The public modulus and exponent, base64url as in a JWK (`n`, `e`).
    pub fn public_jwk_components(&self) -> (String, String) {
        let public = self.pair.public_key();
        (
            URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
        )
    }

    /// Writes the private key as PKCS#8 PEM to a new file of mode 0600.
    /// Never overwrites: an existing file is an `AlreadyExists` error.
    pub fn write_private_pem(&self, path: &Path) -> io::Result<()> {
        let der: Pkcs8V1Der<'static> = self
            .pair
            .as_der()
            .map_err(|_| io::Error::other("the crypto library could not encode the key"))?;
        let pem = encode_pem("PRIVATE KEY", der.as_ref());
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(&pem)?;
        file.sync_all()
    }

    fn from_der(path: &Path, der: PrivateKeyDer) -> Result<Self, Error> {
        let malformed = |reason: &str| Error::Malformed {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let pkcs1 = match &der {
            PrivateKeyDer::Pkcs8(bytes) => {
                pkcs8_rsa_private_key(bytes).map_err(|problem| match problem {
                    Pkcs8Problem::Malformed(reason) => malformed(reason),
                    Pkcs8Problem::Algorithm(kind) => Error::NotRsa {
                        path: path.to_owned(),
                        kind,
                    },
                })?
            }
            PrivateKeyDer::Pkcs1(bytes) => &bytes[..],
        };
        let bits = rsa_modulus_bits(pkcs1).ok_or_else(|| malformed("not a valid RSAPrivateKey"))?;
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(Error::Size {
                path: path.to_owned(),
                bits,
            });
        }
        let (pair, der) = match der {
            PrivateKeyDer::Pkcs8(bytes) => (KeyPair::from_pkcs8(&bytes), bytes),
            PrivateKeyDer::Pkcs1(bytes) => (KeyPair::from_der(&bytes), bytes),
        };
        let pair = pair.map_err(|rejected| {
            malformed(&format!("the crypto library rejected it: {rejected}"))
        })?;
        let mut key =
            Self::from_pair(pair).ok_or_else(|| malformed("its public key cannot be encoded"))?;
        key._locked_der = Some(der);
        Ok(key)
    }

    fn from_pair(pair: KeyPair) -> Option<Self> {
        let bits = pair.public_modulus_len() * 8;
        let mut key = SigningKey {
            pair,
            key_id: String::new(),
            bits,
            _locked_der: None,
        };
        let (n, e) = key.public_jwk_components();
        // RFC 7638: the required members in lexicographic order, no spaces.
        let thumbprint_input = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, thumbprint_input.as_bytes());
        key.key_id = URL_SAFE_NO_PAD.encode(digest.as_ref());
        Some(key)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// Reads the whole file into a locked buffer after checking ownership and
/// mode on the open file (not the path, so a swap cannot slip by).
fn read_key_file(path: &Path, options: LoadOptions) -> Result<LockedBuf, Error> {
    let unreadable = |error: io::Error| Error::Unreadable {
        path: path.to_owned(),
        reason: describe_io(&error),
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(Error::Missing {
                path: path.to_owned(),
            });
        }
        Err(error) => return Err(unreadable(error)),
    };
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(unreadable(io::Error::other("it is not a regular file")));
    }
    let mode = metadata.mode() & 0o7777;
    // ssh's rule: a key of our own uid must not be open to group or others.
    // A file of another uid that we can read (a systemd credential, an ACL)
    // was deliberately shared with us, so it is accepted.
    if metadata.uid() == rustix::process::geteuid().as_raw()
        && mode & 0o077 != 0
        && !options.allow_insecure_permissions
    {
        return Err(Error::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if metadata.len() > MAX_FILE_BYTES {
        return Err(Error::TooLarge {
            path: path.to_owned(),
        });
    }
    // The buffer is sized up front and read into directly, so the file's
    // bytes never pass through an ordinary heap buffer.
    let capacity = usize::try_from(metadata.len()).unwrap_or(0) + 1;
    let mut contents = locked_buffer(path, capacity, options)?;
    loop {
        match file.read(contents.spare()) {
            Ok(0) => break,
            Ok(read) => {
                contents.advance(read);
                if contents.spare().is_empty() {
                    return Err(Error::TooLarge {
                        path: path.to_owned(),
                    });
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(unreadable(error)),
        }
    }
    if contents.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::Empty {
            path: path.to_owned(),
        });
    }
    Ok(contents)
}

fn locked_buffer(path: &Path, capacity: usize, options: LoadOptions) -> Result<LockedBuf, Error> {
    let buffer = LockedBuf::with_capacity(capacity).map_err(|error| Error::Unreadable {
        path: path.to_owned(),
        reason: format!("cannot map memory for it: {error}"),
    })?;
    if options.require_locked_memory && !buffer.is_locked() {
        return Err(Error::Unlockable {
            path: path.to_owned(),
        });
    }
    Ok(buffer)
}

fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::PermissionDenied => format!(
            "permission denied for uid {}: make the file readable by the agent's user",
            rustix::process::geteuid().as_raw()
        ),
        _ => error.to_string(),
    }
}

/// The DER of the one private key in a PEM file, in a locked buffer.
enum PrivateKeyDer {
    Pkcs8(LockedBuf),
    Pkcs1(LockedBuf),
}

/// One `-----BEGIN label-----` ... `-----END label-----` block.
struct PemBlock {
    label: String,
    /// An RFC 1421 `Proc-Type: 4,ENCRYPTED` header (OpenSSL's legacy encryption).
    encrypted_header: bool,
    /// The base64 text with line breaks removed.
    base64: LockedBuf,
}

fn decode_private_key_pem(
    path: &Path,
    contents: &[u8],
    options: LoadOptions,
) -> Result<PrivateKeyDer, Error> {
    let blocks = pem_blocks(path, contents, options)?;
    let private: Vec<&PemBlock> = blocks
        .iter()
        .filter(|block| block.label.ends_with("PRIVATE KEY"))
        .collect();
    match private.len() {
        0 => {}
        1 => return decode_private_block(path, private[0], options),
        count => {
            return Err(Error::SeveralKeys {
                path: path.to_owned(),
                count,
            });
        }
    }
    let Some(block) = blocks.first() else {
        return Err(Error::NotPem {
            path: path.to_owned(),
        });
    };
    let found = match block.label.as_str() {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => "a public key",
        "CERTIFICATE" | "TRUSTED CERTIFICATE" | "X509 CERTIFICATE" => "a certificate",
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => "a certificate request",
        _ => "something else",
    };
    Err(Error::NotPrivate {
        path: path.to_owned(),
        found,
        label: block.label.clone(),
    })
}

fn decode_private_block(
    path: &Path,
    block: &PemBlock,
    options: LoadOptions,
) -> Result<PrivateKeyDer, Error> {
    let not_rsa = |kind: &str| Error::NotRsa {
        path: path.to_owned(),
        kind: kind.to_owned(),
    };
    if block.encrypted_header {
        return Err(Error::Encrypted {
            path: path.to_owned(),
        });
    }
    let der = || decode_base64(path, &block.base64, options);
    match block.label.as_str() {
        "PRIVATE KEY" => Ok(PrivateKeyDer::Pkcs8(der()?)),
        "RSA PRIVATE KEY" => Ok(PrivateKeyDer::Pkcs1(der()?)),
        "ENCRYPTED PRIVATE KEY" => Err(Error::Encrypted {
            path: path.to_owned(),
        }),
        "OPENSSH PRIVATE KEY" => Err(Error::OpenSsh {
            path: path.to_owned(),
        }),
        "EC PRIVATE KEY" => Err(not_rsa("an EC (elliptic curve) private key")),
        "DSA PRIVATE KEY" => Err(not_rsa("a DSA private key")),
        other => Err(not_rsa(&format!("a `{other}`"))),
    }
}

/// Splits PEM text into blocks. Tolerates CRLF, text around the blocks and
/// any base64 line width; every base64 byte goes into a zeroizing buffer.
fn pem_blocks(path: &Path, contents: &[u8], options: LoadOptions) -> Result<Vec<PemBlock>, Error> {
    let mut blocks = Vec::new();
    let mut current: Option<PemBlock> = None;
    for raw_line in contents.split(|&byte| byte == b'\n') {
        let line = trim_ascii(raw_line);
        if let Some(block) = current.as_mut() {
            if let Some(label) = pem_boundary(line, b"-----END ") {
                if label != block.label {
                    return Err(Error::Malformed {
                        path: path.to_owned(),
                        reason: format!(
                            "the `BEGIN {}` block ends with `END {label}`",
                            block.label
                        ),
                    });
                }
                blocks.extend(current.take());
            } else if line.contains(&b':') {
                // An RFC 1421 header such as `Proc-Type: 4,ENCRYPTED`.
                if line.starts_with(b"Proc-Type:") && line.ends_with(b"ENCRYPTED") {
                    block.encrypted_header = true;
                }
            } else {
                // Cannot overflow: the buffer is as large as the whole file.
                let _ = block.base64.extend_from_slice(line);
            }
        } else if let Some(label) = pem_boundary(line, b"-----BEGIN ") {
            current = Some(PemBlock {
                label,
                encrypted_header: false,
                base64: locked_buffer(path, contents.len(), options)?,
            });
        }
    }
    if let Some(block) = current {
        return Err(Error::Malformed {
            path: path.to_owned(),
            reason: format!(
                "the `BEGIN {}` block has no END line; the file looks truncated",
                block.label
            ),
        });
    }
    Ok(blocks)
}

fn pem_boundary(line: &[u8], prefix: &[u8]) -> Option<String> {
    let label = line.strip_prefix(prefix)?.strip_suffix(b"-----")?;
    String::from_utf8(label.to_vec()).ok()
}

fn trim_ascii(line: &[u8]) -> &[u8] {
    let start = line
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &line[start..end]
}

/// Decodes straight into a locked buffer, so the DER never sits in an
/// ordinary heap buffer.
fn decode_base64(path: &Path, text: &[u8], options: LoadOptions) -> Result<LockedBuf, Error> {
    let mut der = locked_buffer(path, text.len(), options)?;
    let length = STANDARD
        .decode_slice(text, der.spare())
        .map_err(|error| Error::Malformed {
            path: path.to_owned(),
            reason: format!("its base64 does not decode: {error}"),
        })?;
    der.advance(length);
    Ok(der)
}

fn encode_pem(label: &str, der: &[u8]) -> Zeroizing<Vec<u8>> {
    let base64 = Zeroizing::new(STANDARD.encode(der));
    let mut pem = Zeroizing::new(Vec::with_capacity(base64.len() + base64.len() / 64 + 80));
    pem.extend_from_slice(format!("-----BEGIN {label}-----\n").as_bytes());
    for line in base64.as_bytes().chunks(64) {
        pem.extend_from_slice(line);
        pem.push(b'\n');
    }
    pem.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    pem
}

enum Pkcs8Problem {
    Malformed(&'static str),
    Algorithm(String),
}

/// The PKCS#1 RSAPrivateKey inside a PKCS#8 PrivateKeyInfo, after checking
/// that its algorithm is rsaEncryption (and naming it when it is not).
fn pkcs8_rsa_private_key(der: &[u8]) -> Result<&[u8], Pkcs8Problem> {
    let malformed = Pkcs8Problem::Malformed("not a valid PKCS#8 PrivateKeyInfo");
    let (info, _) = der::expect(der, der::SEQUENCE).ok_or(malformed)?;
    let (_version, rest) =
        der::expect(info, der::INTEGER).ok_or(Pkcs8Problem::Malformed("no version"))?;
    let (algorithm, rest) =
        der::expect(rest, der::SEQUENCE).ok_or(Pkcs8Problem::Malformed("no algorithm"))?;
    let (oid, _) =
        der::expect(algorithm, der::OID).ok_or(Pkcs8Problem::Malformed("no algorithm"))?;
    if oid != oid::RSA_ENCRYPTION {
        return Err(Pkcs8Problem::Algorithm(oid::describe(oid)));
    }
    let (private_key, _) =
        der::expect(rest, der::OCTET_STRING).ok_or(Pkcs8Problem::Malformed("no private key"))?;
    Ok(private_key)
}

/// The bit length of the modulus of a PKCS#1 RSAPrivateKey.
fn rsa_modulus_bits(pkcs1: &[u8]) -> Option<usize> {
    let (key, _) = der::expect(pkcs1, der::SEQUENCE)?;
    let (_version, rest) = der::expect(key, der::INTEGER)?;
    let (modulus, _) = der::expect(rest, der::INTEGER)?;
    let first = modulus.iter().position(|&byte| byte != 0)?;
    let leading_bits = 8 - modulus[first].leading_zeros() as usize;
    Some((modulus.len() - first - 1) * 8 + leading_bits)
}

/// Just enough DER to find a key's algorithm and size before handing the
/// bytes to aws-lc, so refusals can say what the file holds.
mod der {
    pub const INTEGER: u8 = 0x02;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const SEQUENCE: u8 = 0x30;

    /// Reads one element with tag `tag`: its contents and what follows it.
    pub fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&found, rest) = input.split_first()?;
        if found != tag {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (length, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let (bytes, rest) = rest.split_at(count);
            let length = bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (length, rest)
        };
        (rest.len() >= length).then(|| rest.split_at(length))
    }
}

mod oid {
    pub const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

    /// Names a PKCS#8 algorithm for a refusal message.
    pub fn describe(oid: &[u8]) -> String {
        let name = match oid {
            [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a] => {
                "an RSA-PSS key, which cannot sign RS256"
            }
            [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01] => "an EC (elliptic curve) private key",
            [0x2b, 0x65, 0x70] => "an Ed25519 private key",
            [0x2b, 0x65, 0x71] => "an Ed448 private key",
            [0x2b, 0x65, 0x6e] => "an X25519 private key",
            [0x2b, 0x65, 0x6f] => "an X448 private key",
            [0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x01] => "a DSA private key",
            [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x03, 0x01] => {
                "a Diffie-Hellman private key"
            }
            _ => "a private key of an unknown algorithm",
        };
        name.to_owned()
    }
}

/// Creates `dir` (mode 0700) when missing; used for the default key folder.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulus_bits_ignore_the_sign_byte() {
        // SEQUENCE { INTEGER 0, INTEGER 0x00 0x80 0x00 } is a 16-bit modulus.
        let der = [0x30, 0x08, 0x02, 0x01, 0x00, 0x02, 0x03, 0x00, 0x80, 0x00];
        assert_eq!(rsa_modulus_bits(&der), Some(16));
    }

    #[test]
    fn der_long_lengths_are_read() {
        let mut der = vec![0x04, 0x82, 0x01, 0x00];
        der.extend(std::iter::repeat_n(7u8, 256));
        let (contents, rest) = der::expect(&der, der::OCTET_STRING).unwrap();
        assert_eq!(contents.len(), 256);
        assert!(rest.is_empty());
        assert!(der::expect(&der[..100], der::OCTET_STRING).is_none());
    }

    #[test]
    fn debug_shows_the_fingerprint_and_no_key_bytes() {
        let key = SigningKey::generate(Bits::Rsa2048).unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains(key.key_id()), "{debug}");
        let (n, _) = key.public_jwk_components();
        assert!(!debug.contains(&n[..16]), "{debug}");
        assert!(debug.len() < 120, "{debug}");
    }

    #[test]
    fn generated_key_round_trips_through_pem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.pem");
        let key = SigningKey::generate(Bits::Rsa2048).unwrap();
        key.write_private_pem(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = SigningKey::load(&path, LoadOptions::default()).unwrap();
        assert_eq!(loaded.key_id(), key.key_id());
        assert_eq!(loaded.bits(), 2048);
        let error = key.write_private_pem(&path).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
    }
}
