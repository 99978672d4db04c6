//! The control process of the memory-scan test in
//! `tests/integration/security.rs`: it holds nothing but the crypto
//! library's parsed form of one RSA key, so the test can see how often a
//! key's primes show up in memory when only aws-lc keeps them.
//!
//! Usage: `parsed_key_holder KEY.der` (PKCS#8). It parses the key, signs
//! once (so any lazily built state exists, as in an agent that has issued
//! tokens), zeroizes the bytes it read, prints `ready` and then waits for
//! end of input on stdin before it exits.

use std::io::{self, Read, Write};

use aws_lc_rs::{rand::SystemRandom, rsa::KeyPair, signature::RSA_PKCS1_SHA256};
use zeroize::Zeroize;

fn main() {
    let path = std::env::args_os()
        .nth(1)
        .expect("usage: parsed_key_holder KEY.der");
    let mut der = std::fs::read(&path).expect("read the PKCS#8 DER file");
    let pair = KeyPair::from_pkcs8(&der).expect("the file holds a PKCS#8 RSA private key");
    // Zeroizes the whole capacity, so only the parsed key is left.
    der.zeroize();
    drop(der);
    let mut signature = vec![0; pair.public_modulus_len()];
    pair.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        b"control",
        &mut signature,
    )
    .expect("sign once");
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready").expect("write to stdout");
    stdout.flush().expect("flush stdout");
    drop(stdout);
    let mut rest = Vec::new();
    let _ = io::stdin().read_to_end(&mut rest);
    drop(pair);
}
