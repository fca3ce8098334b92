//! Random tokens from the operating system's generator: login ids, refresh tokens,
//! account stamps, JWT ids. Without OS randomness nothing parley issues would be safe,
//! so a failure aborts rather than falling back to anything weaker.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Random bytes from the OS, base64url without padding.
pub fn random_token_bytes(n: usize) -> String {
    let mut buf = vec![0u8; n];
    if let Err(e) = getrandom::fill(&mut buf) {
        // Without OS randomness nothing we issue would be safe.
        log::error!("OS random number generator failed: {e}");
        std::process::abort();
    }
    URL_SAFE_NO_PAD.encode(buf)
}

/// A 256-bit random token (refresh tokens, ids).
pub fn random_token() -> String {
    random_token_bytes(32)
}
