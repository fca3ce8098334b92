//! Reading a tiny_http request and writing its answer: headers, the bearer token,
//! query parameters, the peer's address, and [`Reply`].
//!
//! Shared by the two doors that take raw requests, [`crate::http`] (routes) and
//! [`crate::ws`] (the upgrade), so neither depends on the other for these.

use crate::config::Cidr;
use crate::error::ApiError;
use serde_json::Value;
use std::io::Read;
use std::net::IpAddr;
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

/// Where a request really came from: its peer, or — when the peer is a trusted proxy
/// (`--trusted-proxy`) — the client the proxy speaks for, with the scheme and host that
/// client used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address.
    pub ip: Option<IpAddr>,
    /// Whether the client used https.
    pub https: bool,
    /// The host the client asked for.
    pub host: String,
}

/// Resolves the client of `rq`. Only a peer inside `proxies` is believed: the client
/// is the right-most `X-Forwarded-For` entry (all such headers, in order) that is not
/// itself a trusted proxy — or the same from RFC 7239 `Forwarded: for=` — and the
/// scheme and host come from `X-Forwarded-Proto`/`-Host` (or `proto=`/`host=`).
/// Malformed values are passed over; from any other peer these headers are ignored.
pub fn client(rq: &Request, proxies: &[Cidr]) -> Client {
    let peer = rq.remote_addr().map(|a| a.ip());
    let own = Client {
        ip: peer,
        https: false,
        host: header_value(rq, "Host").unwrap_or("").to_owned(),
    };
    let trusted = |ip: IpAddr| proxies.iter().any(|c| c.contains(ip));
    if !peer.is_some_and(trusted) {
        return own;
    }
    let fwd = forwarded(rq);
    let chain: Vec<IpAddr> = fwd.chain.iter().filter_map(|e| parse_node(e)).collect();
    let ip = chain
        .iter()
        .rev()
        .find(|ip| !trusted(**ip))
        .or(chain.first())
        .copied()
        .or(peer);
    let host = fwd.host.filter(|h| valid_host(h)).unwrap_or(own.host);
    let https = fwd.proto.is_some_and(|p| p.eq_ignore_ascii_case("https"));
    Client { ip, https, host }
}

/// What the forwarding headers say, before anything is believed.
#[derive(Default)]
struct Forwarding {
    chain: Vec<String>,
    proto: Option<String>,
    host: Option<String>,
}

/// All `X-Forwarded-For` entries in order (else `Forwarded: for=`), and the first
/// proto and host given.
fn forwarded(rq: &Request) -> Forwarding {
    let all = |name: &'static str| -> Vec<String> {
        rq.headers()
            .iter()
            .filter(|h| h.field.equiv(name))
            .flat_map(|h| h.value.as_str().split(','))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect()
    };
    let first = |name: &'static str| all(name).into_iter().next();
    let xff = all("X-Forwarded-For");
    if !xff.is_empty() {
        return Forwarding {
            chain: xff,
            proto: first("X-Forwarded-Proto"),
            host: first("X-Forwarded-Host"),
        };
    }
    let mut f = Forwarding::default();
    for element in all("Forwarded") {
        for pair in element.split(';') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').to_owned();
            match k.trim().to_ascii_lowercase().as_str() {
                "for" => f.chain.push(v),
                "proto" if f.proto.is_none() => f.proto = Some(v),
                "host" if f.host.is_none() => f.host = Some(v),
                _ => {}
            }
        }
    }
    f
}

/// An address from a forwarding header: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
/// `[2001:db8::1]:443`; `unknown` and obfuscated names are not addresses.
fn parse_node(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| s.trim_start_matches('[').trim_end_matches(']').parse().ok())
}

/// A host (and port) a browser could have used: nothing a header or policy could be
/// bent by.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// The client's IP without port (see [`client`]).
pub fn client_ip(rq: &Request, proxies: &[Cidr]) -> Option<String> {
    client(rq, proxies).ip.map(|ip| ip.to_string())
}

/// The Origin rule (the upgrade's, and cookie requests'): an `Origin` must be the
/// request's own origin (`http://` or `https://` and the host the client asked for)
/// or one of `allowed` (`*` allows all). `None` when the request carries none.
pub fn origin_allowed(rq: &Request, allowed: &[String], proxies: &[Cidr]) -> Option<bool> {
    let origin = header_value(rq, "Origin")?;
    let host = client(rq, proxies).host;
    let own = [format!("http://{host}"), format!("https://{host}")];
    Some(
        own.iter().any(|o| o.eq_ignore_ascii_case(origin))
            || allowed
                .iter()
                .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin)),
    )
}

/// Whether the client used https (so a cookie may be marked `Secure`). parley speaks
/// plain HTTP itself; only a trusted proxy can say so.
pub fn is_https(rq: &Request, proxies: &[Cidr]) -> bool {
    client(rq, proxies).https
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

/// Whether the request says `Connection: upgrade`: tiny_http then hands over the raw
/// stream as its body, not limited to its `Content-Length`.
pub fn connection_upgrade(rq: &Request) -> bool {
    header_value(rq, "Connection").is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// Whether tiny_http left the request's body to be read from the connection on demand
/// (so reading it, or even dropping the request, may wait on the client): a body over
/// 1 KiB, a chunked one, one announced with `Expect: 100-continue`, or any body on a
/// `Connection: upgrade` request. Smaller bodies it has read ahead, before handing
/// the request over.
pub fn reads_body_on_demand(rq: &Request) -> bool {
    let chunked = header_value(rq, "Transfer-Encoding").is_some();
    let length = rq.body_length().unwrap_or(0);
    if connection_upgrade(rq) {
        return chunked || length > 0;
    }
    chunked || length > 1024 || (length > 0 && header_value(rq, "Expect").is_some())
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

    fn with(headers: &[(&str, &str)]) -> Request {
        let mut t = tiny_http::TestRequest::new();
        for (k, v) in headers {
            t = t.with_header(Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap());
        }
        t.into()
    }

    #[test]
    fn which_bodies_are_read_on_demand() {
        let mut rq = with(&[]);
        assert!(!reads_body_on_demand(&rq), "no body");
        assert!(!connection_upgrade(&rq));
        rq = tiny_http::TestRequest::new().with_body("{}").into();
        assert!(!reads_body_on_demand(&rq), "read ahead");
        rq = with(&[("Content-Length", "1025")]);
        assert!(reads_body_on_demand(&rq), "over 1 KiB");
        rq = with(&[("Content-Length", "5"), ("Expect", "100-continue")]);
        assert!(reads_body_on_demand(&rq), "100-continue");
        rq = with(&[("Transfer-Encoding", "chunked")]);
        assert!(reads_body_on_demand(&rq), "chunked");
        rq = with(&[("Connection", "keep-alive, Upgrade")]);
        assert!(connection_upgrade(&rq));
        assert!(!reads_body_on_demand(&rq), "an upgrade without a body");
        rq = with(&[("Connection", "upgrade"), ("Content-Length", "3")]);
        assert!(reads_body_on_demand(&rq), "any body on an upgrade");
    }

    #[test]
    fn query_and_decoding() {
        assert_eq!(query_param("/x?a=1&b=%41+c", "b").as_deref(), Some("A c"));
        assert_eq!(query_param("/x?a=1", "b"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
