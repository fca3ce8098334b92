//! The web client's refresh-token cookie, `parley_refresh`.
//!
//! A page keeps its access token in memory only; so that a reload does not log the
//! person out, login can put the refresh token in an HttpOnly cookie instead of the
//! JSON answer (`"cookie": true`). The cookie is `SameSite=Strict` and scoped to
//! `/api/`, and a request that uses it must also carry an `Origin` the upgrade rule
//! accepts: a missing or foreign one is refused (403) and changes nothing.

use crate::config::Config;
use crate::error::ApiError;
use crate::request::{cookie, is_https, origin_allowed};
use tiny_http::Request;

/// The cookie's name.
pub const NAME: &str = "parley_refresh";

/// `Set-Cookie` value carrying `token` for `max_age` seconds.
pub fn set(rq: &Request, cfg: &Config, token: &str, max_age: u64) -> String {
    format!(
        "{NAME}={token}; HttpOnly; SameSite=Strict; Path=/api/; Max-Age={max_age}{}",
        secure(rq, cfg)
    )
}

/// `Set-Cookie` value that removes the cookie.
pub fn clear(rq: &Request, cfg: &Config) -> String {
    format!(
        "{NAME}=; HttpOnly; SameSite=Strict; Path=/api/; Max-Age=0{}",
        secure(rq, cfg)
    )
}

/// `Secure` when the client used https (as a trusted proxy says).
fn secure(rq: &Request, cfg: &Config) -> &'static str {
    if is_https(rq, &cfg.trusted_proxies) {
        "; Secure"
    } else {
        ""
    }
}

/// The refresh token in the request's cookie, if it carries one; refused (403) when
/// the request's Origin is missing or not allowed.
pub fn token(rq: &Request, cfg: &Config) -> Result<Option<String>, ApiError> {
    let Some(value) = cookie(rq, NAME).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match origin_allowed(rq, &cfg.allow_origins, &cfg.trusted_proxies) {
        Some(true) => Ok(Some(value.to_owned())),
        _ => Err(ApiError::forbidden(
            "a request that uses the refresh cookie needs an allowed Origin",
        )),
    }
}
