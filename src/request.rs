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
    body: Option<Value>,
    retry_after: Option<u64>,
    content_type: &'static str,
    text: Option<String>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body: Some(body),
            retry_after: None,
            content_type: "application/json",
            text: None,
        }
    }

    /// 204 with no body.
    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            body: None,
            retry_after: None,
            content_type: "application/json",
            text: None,
        }
    }

    /// 200 with a text body of the given type.
    pub fn text(content_type: &'static str, text: String) -> Reply {
        Reply {
            status: 200,
            body: None,
            retry_after: None,
            content_type,
            text: Some(text),
        }
    }

    /// The error's status and JSON body.
    pub fn error(e: &ApiError) -> Reply {
        Reply {
            retry_after: e.retry_after,
            ..Reply::json(e.http_status(), e.http_body())
        }
    }

    /// Converts to a tiny_http response.
    pub fn into_response(self) -> Response<std::io::Cursor<Vec<u8>>> {
        let data = match (self.text, self.body) {
            (Some(t), _) => t.into_bytes(),
            (None, Some(b)) => b.to_string().into_bytes(),
            (None, None) => Vec::new(),
        };
        let mut resp = Response::from_data(data).with_status_code(self.status);
        resp = with_header(resp, "Content-Type", self.content_type);
        resp = with_header(resp, "Cache-Control", "no-store");
        resp = with_header(resp, "X-Content-Type-Options", "nosniff");
        if let Some(secs) = self.retry_after {
            resp = with_header(resp, "Retry-After", &secs.to_string());
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
