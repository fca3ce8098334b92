//! The built-in web client: `GET /` is `web/index.html` and `GET /static/<path>` any
//! other file under `web/`, all embedded at build time (see `build.rs`), so the binary
//! needs no files beside it and works on an offline LAN.
//!
//! Every page and asset carries a Content-Security-Policy that allows nothing but our
//! own origin (no inline script or style, no eval, no framing), plus `nosniff` and no
//! referrer. Assets have an ETag (a hash of their bytes) and are revalidated on each
//! use, so an upgraded server never leaves a browser with a stale client.

use crate::config::Cidr;
use crate::request::{client, header_value, Reply};
use tiny_http::Request;

include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));

/// The answer for `path` if it names the page or an asset, else `None`.
pub fn serve(rq: &Request, path: &str, proxies: &[Cidr]) -> Option<Reply> {
    let file = match path {
        "/" | "/index.html" => "index.html",
        _ => path.strip_prefix("/static/")?,
    };
    let (name, body, etag) = ASSETS.iter().find(|(p, _, _)| *p == file)?;
    let fresh = header_value(rq, "If-None-Match").is_some_and(|v| v.contains(etag));
    let reply = match fresh {
        true => Reply::bytes(304, content_type(name), Vec::new()),
        false => Reply::bytes(200, content_type(name), body.to_vec()),
    };
    Some(
        reply
            .header("ETag", *etag)
            .header("Cache-Control", "no-cache")
            .header("Content-Security-Policy", policy(rq, proxies))
            .header("X-Frame-Options", "DENY"),
    )
}

/// The page's CSP. Sockets go to our own host (`'self'` covers ws/wss in newer
/// browsers only, so they are named) — the host the browser sees, which behind a
/// trusted proxy is the one it forwards.
fn policy(rq: &Request, proxies: &[Cidr]) -> String {
    let host: String = client(rq, proxies)
        .host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']'))
        .collect();
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self' ws://{host} wss://{host}; frame-ancestors 'none'; \
         base-uri 'none'; form-action 'self'; object-src 'none'"
    )
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("webmanifest") => "application/manifest+json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}
