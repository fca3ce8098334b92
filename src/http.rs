//! HTTP routes on top of tiny_http: parse, authenticate, call [`crate::actions`],
//! answer JSON.
//!
//! A fixed pool of worker threads ([`crate::front`]) takes requests from tiny_http's
//! queue and hands them to [`crate::exchange`], which decides where each runs (a worker,
//! or an IO thread when it has a body to read) and where its answer is written, so that
//! no worker waits on a client; `/ws` upgrades are handed to [`crate::ws`]. Routing is
//! one `match` over the method and the path's segments (in the manner of rouille), so
//! every route is listed in [`route`] (and in docs/http.md). Every answer is JSON,
//! errors included, in one shape.

use crate::actions::{self, Actor};
use crate::app::App;
use crate::cookie;
use crate::error::ApiError;
use crate::exchange::{Exchange, HEAD_BYTES};
use crate::model::Page;
use crate::request::{
    bearer_token, client_ip, connection_upgrade, header_value, percent_decode, query_param, Reply,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use std::io::Read;
use std::sync::Arc;
use tiny_http::{Method, Request};

/// Stack size of the threads that run handlers (HTTP workers and IO threads).
pub const HANDLER_STACK: usize = 512 * 1024;

/// Answers one request whose turn it is, on the thread [`crate::exchange`] chose; the
/// caller catches a handler's panic.
pub fn dispatch(app: &Arc<App>, mut ex: Exchange) {
    let path = ex.rq.url().split('?').next().unwrap_or("").to_owned();
    if path == "/ws" {
        // What the upgrade writes (a 101, or a short refusal) fits in HEAD_BYTES.
        return ex.write(HEAD_BYTES, crate::ws::upgrade);
    }
    if path == "/graphql" && crate::graphql::socket::wants_upgrade(&ex.rq) {
        return ex.write(HEAD_BYTES, crate::graphql::upgrade);
    }
    if *ex.rq.method() == Method::Post && (path == "/api/login" || path == "/api/register") {
        return password_route(app, ex, path == "/api/login");
    }
    if *ex.rq.method() == Method::Get {
        if let Some(reply) = crate::web::serve(&ex.rq, &path, &app.cfg.trusted_proxies) {
            return ex.respond(reply);
        }
    }
    let reply = match route(app, &mut ex.rq, &path) {
        Ok(r) => r,
        Err(e) => Reply::error(&e),
    };
    ex.respond(reply);
}

/// Every route. A known path with the wrong method is 405; anything else 404.
fn route(app: &Arc<App>, rq: &mut Request, path: &str) -> Result<Reply, ApiError> {
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = rq.method().clone();
    use Method::{Get, Post};
    match (segs.as_slice(), &method) {
        (["healthz"], Get) => Ok(Reply::json(200, json!({"status": "ok"}))),
        (["graphql"], Get) => crate::graphql::http::get(app, rq, identify(app, rq)?),
        (["graphql"], Post) => {
            let actor = identify(app, rq)?;
            let raw = read_body(app, rq)?;
            require_json(rq)?;
            crate::graphql::http::post(app, rq, actor, &raw)
        }
        (["metrics"], Get) => Ok(metrics(app)),
        (["api", "refresh"], Post) => refresh(app, rq),
        (["api", "logout"], Post) => logout(app, rq),
        (["api", "me"], Get) => {
            let actor = authenticate(app, rq)?;
            Ok(Reply::json(200, json!({"user": actions::me(app, &actor)?})))
        }
        (["api", "rooms"], Get) => {
            authenticate(app, rq)?;
            let after = query_param(rq.url(), "after");
            let limit = int_param(rq.url(), "limit")?;
            let rooms = actions::list_rooms(app, after.as_deref(), limit)?;
            Ok(Reply::json(200, json!({ "rooms": rooms })))
        }
        (["api", "rooms"], Post) => create_room(app, rq),
        (["api", "rooms", room, "messages"], Get) => {
            authenticate(app, rq)?;
            let page = page_from_query(rq.url())?;
            Ok(Reply::json(
                200,
                json!({"messages": actions::room_history(app, room, page)?}),
            ))
        }
        (["api", "rooms", room, "online"], Get) => {
            authenticate(app, rq)?;
            let after = query_param(rq.url(), "after");
            let limit = int_param(rq.url(), "limit")?;
            let online = actions::room_online(app, room, after.as_deref(), limit)?;
            Ok(Reply::json(200, json!({ "online": online })))
        }
        (["api", "users"], Get) => {
            authenticate(app, rq)?;
            let q = query_param(rq.url(), "q");
            let limit = int_param(rq.url(), "limit")?;
            let users = actions::list_users(app, q.as_deref(), limit)?;
            Ok(Reply::json(200, json!({ "users": users })))
        }
        (["api", "dms"], Get) => {
            let actor = authenticate(app, rq)?;
            let conversations = actions::conversations(app, &actor)?;
            Ok(Reply::json(200, json!({ "conversations": conversations })))
        }
        (["api", "admin", "users"], Get) => {
            let actor = authenticate(app, rq)?;
            let url = rq.url();
            let (q, after) = (query_param(url, "q"), query_param(url, "after"));
            let limit = int_param(url, "limit")?;
            let users = actions::admin_users(app, &actor, q.as_deref(), after.as_deref(), limit)?;
            Ok(Reply::json(200, json!({ "users": users })))
        }
        (["api", "dms", user], Get) => {
            let actor = authenticate(app, rq)?;
            let page = page_from_query(rq.url())?;
            Ok(Reply::json(
                200,
                json!({"messages": actions::dm_history(app, &actor, user, page)?}),
            ))
        }
        (["api", "messages", id], Method::Delete) => {
            let actor = authenticate(app, rq)?;
            let id = id
                .parse::<i64>()
                .map_err(|_| ApiError::not_found("no such message"))?;
            actions::wait_for(|done| actions::delete_message(app, &actor, id, done))?;
            Ok(Reply::no_content())
        }
        (["api", "admin", "users", user, "roles"], Method::Put) => {
            let actor = authenticate(app, rq)?;
            let b: RolesBody = json_body(app, rq)?;
            Ok(Reply::json(
                200,
                json!({"user": actions::set_roles(app, &actor, user, b.roles)?}),
            ))
        }
        (["api", "admin", "users", user, action @ ("ban" | "unban")], Post) => {
            let actor = authenticate(app, rq)?;
            actions::set_banned(app, &actor, user, *action == "ban")?;
            Ok(Reply::no_content())
        }
        (["api", "admin", "users", user, "kick"], Post) => {
            let actor = authenticate(app, rq)?;
            let sockets = actions::kick(app, &actor, user)?;
            Ok(Reply::json(200, json!({"sockets": sockets})))
        }
        (["api", "admin", "announce"], Post) => {
            let actor = authenticate(app, rq)?;
            let b: AnnounceBody = json_body(app, rq)?;
            let sockets = actions::announce(app, &actor, &b.body, b.roles)?;
            Ok(Reply::json(200, json!({"sockets": sockets})))
        }
        (["api", "admin", "audit"], Get) => {
            let actor = authenticate(app, rq)?;
            let (limit, before) = (
                int_param(rq.url(), "limit")?,
                int_param(rq.url(), "before")?,
            );
            Ok(Reply::json(
                200,
                json!({"events": actions::audit_events(app, &actor, limit, before)?}),
            ))
        }
        (segs, _) if known_path(segs) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::not_found("no such route")),
    }
}

fn known_path(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["healthz"]
            | ["metrics"]
            | ["ws"]
            | ["graphql"]
            | [
                "api",
                "register" | "login" | "refresh" | "logout" | "me" | "rooms" | "users" | "dms"
            ]
            | ["api", "admin", "users"]
            | ["api", "rooms", _, "messages" | "online"]
            | ["api", "dms", _]
            | ["api", "messages", _]
            | [
                "api",
                "admin",
                "users",
                _,
                "roles" | "ban" | "unban" | "kick"
            ]
            | ["api", "admin", "announce" | "audit"]
    )
}

fn metrics(app: &App) -> Reply {
    let s = app.store.writer_stats();
    use std::sync::atomic::Ordering::Relaxed;
    let text = crate::metrics::render(&crate::metrics::Gauges {
        open_sockets: app.hub.socket_count(),
        db_batches: s.batches.load(Relaxed),
        db_batched_writes: s.jobs.load(Relaxed),
        db_max_batch: s.max_batch.load(Relaxed),
        db_queued: s.queued.load(Relaxed),
    });
    Reply::text("text/plain; version=0.0.4", text)
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
    /// Web client: the refresh token goes in the HttpOnly cookie, not the JSON.
    #[serde(default)]
    cookie: bool,
}

/// Login and register cost a bcrypt hash: after the cheap checks (body, login rate)
/// they run in the bounded slow lane, or get 429 at once when it is full, so a login
/// flood cannot occupy the workers that serve chat.
fn password_route(app: &Arc<App>, mut ex: Exchange, is_login: bool) {
    let ip = client_ip(&ex.rq, &app.cfg.trusted_proxies);
    let admitted = json_body::<Credentials>(app, &mut ex.rq).and_then(|c| {
        if is_login {
            actions::check_login_rate(app, &c.username, ip.as_deref())?;
        } else {
            actions::check_register_rate(app, ip.as_deref())?;
        }
        let permit = app.slow_lane.reserve().ok_or_else(busy)?;
        Ok((c, permit))
    });
    let (c, permit) = match admitted {
        Ok(ok) => ok,
        Err(e) if e.code == crate::error::Code::RateLimited => {
            return app.tarpit.hold(move || ex.respond(Reply::error(&e)));
        }
        Err(e) => return ex.respond(Reply::error(&e)),
    };
    let app2 = app.clone();
    app.slow_lane.run(permit, move |waited| {
        if waited > PASSWORD_QUEUE_WAIT {
            return ex.respond(Reply::error(&busy()));
        }
        let result = if is_login {
            actions::login(&app2, &c.username, &c.password, ip.as_deref())
                .map(|p| pair_reply(&app2, &ex.rq, p, c.cookie))
        } else {
            actions::register(&app2, &c.username, &c.password, ip.as_deref())
                .map(|u| Reply::json(201, json!({ "user": u })))
        };
        ex.respond(result.unwrap_or_else(|e| Reply::error(&e)));
    });
}

/// Longest a login waits for a password thread before it is refused.
const PASSWORD_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn busy() -> ApiError {
    ApiError::rate_limited("too many password checks in progress; retry shortly", 1)
}

#[derive(Deserialize)]
struct RolesBody {
    roles: Vec<String>,
}

#[derive(Deserialize)]
struct AnnounceBody {
    body: String,
    roles: Option<Vec<String>>,
}

/// The answer to a login or refresh: the pair as JSON, or, for the web client, with
/// the refresh token moved into the HttpOnly cookie.
fn pair_reply(app: &App, rq: &Request, pair: actions::TokenPair, in_cookie: bool) -> Reply {
    let mut v = json!(pair);
    if !in_cookie {
        return Reply::json(200, v);
    }
    if let Some(map) = v.as_object_mut() {
        map.remove("refresh_token");
    }
    let cookie = cookie::set(rq, &app.cfg, &pair.refresh_token, app.auth.refresh_ttl());
    Reply::json(200, v).header("Set-Cookie", cookie)
}

/// `POST /api/refresh` and `/api/logout` take an optional body with a
/// `refresh_token`; without one, the web client's cookie may stand in.
#[derive(Deserialize, Default)]
struct RefreshBody {
    refresh_token: Option<String>,
}

/// An optional JSON body: empty is the default; anything else must be JSON.
fn optional_body<T: DeserializeOwned + Default>(
    app: &App,
    rq: &mut Request,
) -> Result<T, ApiError> {
    let raw = read_body(app, rq)?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    require_json(rq)?;
    parse_json(&raw)
}

fn refresh(app: &App, rq: &mut Request) -> Result<Reply, ApiError> {
    let b: RefreshBody = optional_body(app, rq)?;
    let (token, in_cookie) = match b.refresh_token {
        Some(t) => (t, false),
        None => match cookie::token(rq, &app.cfg)? {
            Some(t) => (t, true),
            None => return Err(ApiError::unauthorized("no refresh token")),
        },
    };
    let pair = actions::refresh(
        app,
        &token,
        client_ip(rq, &app.cfg.trusted_proxies).as_deref(),
    )?;
    Ok(pair_reply(app, rq, pair, in_cookie))
}

fn logout(app: &App, rq: &mut Request) -> Result<Reply, ApiError> {
    let actor = authenticate(app, rq)?;
    let body: RefreshBody = optional_body(app, rq)?;
    let from_cookie = cookie::token(rq, &app.cfg)?;
    let mut tokens: Vec<&str> = body.refresh_token.iter().map(String::as_str).collect();
    tokens.extend(from_cookie.as_deref());
    actions::logout(app, &actor, &tokens)?;
    let reply = Reply::no_content();
    Ok(match from_cookie {
        Some(_) => reply.header("Set-Cookie", cookie::clear(rq, &app.cfg)),
        None => reply,
    })
}

#[derive(Deserialize)]
struct NewRoom {
    name: String,
}

fn create_room(app: &App, rq: &mut Request) -> Result<Reply, ApiError> {
    let actor = authenticate(app, rq)?;
    let b: NewRoom = json_body(app, rq)?;
    let room = actions::create_room(app, &actor, &b.name)?;
    Ok(Reply::json(201, json!({ "room": room })))
}

/// Verifies the `Authorization: Bearer` token against the database's current state.
/// A request that changes something counts against the user's `--msg-rate` budget
/// (logging out never does).
fn authenticate(app: &App, rq: &Request) -> Result<Actor, ApiError> {
    let actor = identify(app, rq)?;
    let reads = matches!(rq.method(), Method::Get | Method::Head);
    if !reads && !rq.url().starts_with("/api/logout") {
        actions::check_write_rate(app, &actor)?;
    }
    Ok(actor)
}

/// The caller behind the `Authorization: Bearer` token, checked against the
/// database's current state (no write is counted: GraphQL counts its own).
fn identify(app: &App, rq: &Request) -> Result<Actor, ApiError> {
    let token = bearer_token(rq).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let id = app.auth.authenticate(&app.store, token)?;
    Ok(Actor::new(&id, client_ip(rq, &app.cfg.trusted_proxies)))
}

fn require_json(rq: &Request) -> Result<(), ApiError> {
    let ct = header_value(rq, "Content-Type").unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type())
    }
}

/// Reads the body, refusing more than `max_body_bytes` with 413.
fn read_body(app: &App, rq: &mut Request) -> Result<Vec<u8>, ApiError> {
    let max = app.cfg.max_body_bytes;
    if rq.body_length().is_some_and(|n| n > max) {
        return Err(ApiError::too_large(format!("body is over {max} bytes")));
    }
    // On a `Connection: upgrade` request tiny_http hands over the raw stream: read only
    // what Content-Length announces, or we would wait for bytes that never come.
    let limit = match connection_upgrade(rq) {
        true => rq.body_length().unwrap_or(0),
        false => max + 1,
    };
    let mut buf = Vec::new();
    rq.as_reader()
        .take(limit as u64)
        .read_to_end(&mut buf)
        .map_err(|_| ApiError::bad_request("could not read the body"))?;
    if buf.len() > max {
        return Err(ApiError::too_large(format!("body is over {max} bytes")));
    }
    Ok(buf)
}

fn parse_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

/// A JSON body of the given shape: 413, 415 or 400 otherwise.
fn json_body<T: DeserializeOwned>(app: &App, rq: &mut Request) -> Result<T, ApiError> {
    let raw = read_body(app, rq)?;
    require_json(rq)?;
    parse_json(&raw)
}

fn int_param(url: &str, name: &str) -> Result<Option<i64>, ApiError> {
    query_param(url, name)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("`{name}` must be an integer")))
        })
        .transpose()
}

fn page_from_query(url: &str) -> Result<Page, ApiError> {
    Ok(Page::new(
        int_param(url, "before")?,
        int_param(url, "after")?,
        int_param(url, "limit")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_decoding() {
        assert!(page_from_query("/x?limit=abc").is_err());
        assert_eq!(page_from_query("/x?limit=500&after=3").unwrap().limit, 200);
    }
}
