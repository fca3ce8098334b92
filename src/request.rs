//! Reading a tiny_http request and writing its answer: headers, the bearer token,
//! query parameters, the peer's address, and [`Reply`].
//!
//! Shared by the two doors that take raw requests, [`crate::http`] (routes) and
//! [`crate::ws`] (the upgrade), so neither depends on the other for these.

use crate::error::ApiError;
use serde_json::Value;
use std::io::Read;
use tiny_http::{Header, Request, Response};

/// A response before it is written.
pub struct Reply {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: Value) -> Reply {
        Reply::bytes(status, "application/json", body.to_string().into_bytes())
    }

    /// 204 with no body.
    pub fn no_content() -> Reply {
        Reply::bytes(204, "application/json", Vec::new())
    }

    /// 200 with a text body of the given type.
    pub fn text(content_type: &'static str, text: String) -> Reply {
        Reply::bytes(200, content_type, text.into_bytes())
    }

    /// Any body of the given type.
    pub fn bytes(status: u16, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body,
            content_type,
            headers: Vec::new(),
        }
    }

    /// The error's status and JSON body.
    pub fn error(e: &ApiError) -> Reply {
        let reply = Reply::json(e.http_status(), e.http_body());
        match e.retry_after {
            Some(secs) => reply.header("Retry-After", secs.to_string()),
            None => reply,
        }
    }

    /// Adds a header (`Cache-Control` replaces the default `no-store`).
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// Converts to a tiny_http response. Every answer says `nosniff` and sends no
    /// referrer; answers are not cached unless they say otherwise.
    pub fn into_response(self) -> Response<std::io::Cursor<Vec<u8>>> {
        let mut resp = Response::from_data(self.body).with_status_code(self.status);
        resp = with_header(resp, "Content-Type", self.content_type);
        if !self.headers.iter().any(|(n, _)| *n == "Cache-Control") {
            resp = with_header(resp, "Cache-Control", "no-store");
        }
        resp = with_header(resp, "X-Content-Type-Options", "nosniff");
        resp = with_header(resp, "Referrer-Policy", "no-referrer");
        for (name, value) in &self.headers {
            resp = with_header(resp, name, value);
        }
        resp
    }
}

/// Adds a header. One that is not ASCII (never so for the constants and encodings we
/// send) is left out rather than panicking.
pub fn with_header<R: Read>(resp: Response<R>, name: &str, value: &str) -> Response<R> {
    match Header::from_bytes(name.as_bytes(), value.as_bytes()) {
        Ok(h) => resp.with_header(h),
        Err(()) => resp,
    }
}

/// The value of cookie `name`, if the request carries it.
pub fn cookie<'a>(rq: &'a Request, name: &str) -> Option<&'a str> {
    rq.headers()
        .iter()
        .filter(|h| h.field.equiv("Cookie"))
        .flat_map(|h| h.value.as_str().split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// The Origin rule (the upgrade's, and cookie requests'): an `Origin` must be the
/// request's own origin (`http://` or `https://` and its `Host`) or one of `allowed`
/// (`*` allows all). `None` when the request carries none.
pub fn origin_allowed(rq: &Request, allowed: &[String]) -> Option<bool> {
    let origin = header_value(rq, "Origin")?;
    let host = header_value(rq, "Host").unwrap_or("");
    let own = [format!("http://{host}"), format!("https://{host}")];
    Some(
        own.iter().any(|o| o.eq_ignore_ascii_case(origin))
            || allowed
                .iter()
                .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin)),
    )
}

/// Whether the request came over https (so a cookie may be marked `Secure`). parley
/// speaks plain HTTP itself; only a trusted proxy could say otherwise.
pub fn is_https(_rq: &Request) -> bool {
    false
}

/// The peer's IP without port.
pub fn peer_ip(request: &Request) -> Option<String> {
    request.remote_addr().map(|a| a.ip().to_string())
}

/// The token of an `Authorization: Bearer` header, if there is one.
pub fn bearer_token(rq: &Request) -> Option<&str> {
    let value = header_value(rq, "Authorization")?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The first value of a header, by case-insensitive name.
pub fn header_value<'a>(rq: &'a Request, name: &str) -> Option<&'a str> {
    rq.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// The value of query parameter `name`, percent-decoded.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+`; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let hex = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_decoding() {
        assert_eq!(query_param("/x?a=1&b=%41+c", "b").as_deref(), Some("A c"));
        assert_eq!(query_param("/x?a=1", "b"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
