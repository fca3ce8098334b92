//! Helpers for the GraphQL tests: requests over HTTP, and a `graphql-transport-ws`
//! client over tungstenite. Included by the tests that need them with
//! `#[path = "common/graphql.rs"] mod gql;`.
#![allow(dead_code)]

use super::common::*;
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// `POST /graphql` with `query` and `variables` as the holder of `token`; the
/// response, unchecked.
pub fn post(srv: &Server, token: &str, query: &str, variables: Value) -> Resp {
    post_with(
        srv,
        Some(token),
        &json!({"query": query, "variables": variables}),
        &[],
    )
}

/// `POST /graphql` with a JSON body and extra headers.
pub fn post_with(
    srv: &Server,
    token: Option<&str>,
    body: &Value,
    headers: &[(&str, &str)],
) -> Resp {
    let b = serde_json::to_vec(body).unwrap();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        h.push(("Authorization", a));
    }
    h.extend_from_slice(headers);
    http_request(srv.port, "POST", "/graphql", &h, Some(&b))
}

/// Runs `query`; asserts HTTP 200 and no errors; returns `data`.
#[track_caller]
pub fn data(srv: &Server, token: &str, query: &str, variables: Value) -> Value {
    let r = post(srv, token, query, variables);
    assert_status(&r, 200);
    let v = r.json();
    assert!(
        v.get("errors").is_none(),
        "unexpected errors for {query}: {v}"
    );
    v["data"].clone()
}

/// Runs `query`; asserts HTTP 200 and one error with `extensions.code` = `code`;
/// returns the whole response.
#[track_caller]
pub fn error(srv: &Server, token: &str, query: &str, variables: Value, code: &str) -> Value {
    let r = post(srv, token, query, variables);
    assert_status(&r, 200);
    let v = r.json();
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors in {v}"));
    assert_eq!(errors[0]["extensions"]["code"], code, "wrong code in {v}");
    assert!(
        errors[0]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v
}

/// A `graphql-transport-ws` client.
pub struct GqlWs {
    pub ws: Ws,
}

/// The upgrade request for `/graphql` (plus `query`), offering `graphql-transport-ws`.
pub fn ws_request_for(srv: &Server, query: &str) -> tungstenite::http::Request<()> {
    with_header(
        ws_request(srv, &format!("/graphql{query}")),
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws",
    )
}

impl GqlWs {
    /// Connects with `Authorization: Bearer <token>` and does `connection_init`.
    #[track_caller]
    pub fn connect(srv: &Server, token: &str) -> GqlWs {
        let mut c = GqlWs::open(srv, token);
        c.init();
        c
    }

    /// Connects (the token in a header) without `connection_init`.
    #[track_caller]
    pub fn open(srv: &Server, token: &str) -> GqlWs {
        let req = with_header(
            ws_request_for(srv, ""),
            "Authorization",
            &format!("Bearer {token}"),
        );
        let ws =
            Ws::try_connect(srv, req).unwrap_or_else(|e| panic!("graphql upgrade failed: {e:?}"));
        assert_eq!(
            ws.response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some("graphql-transport-ws")
        );
        GqlWs { ws }
    }

    /// `connection_init`, then the `connection_ack`.
    #[track_caller]
    pub fn init(&mut self) {
        self.send(&json!({"type": "connection_init", "payload": {}}));
        let v = self.recv();
        assert_eq!(v["type"], "connection_ack", "{v}");
    }

    pub fn send(&mut self, v: &Value) {
        self.ws.send(v);
    }

    #[track_caller]
    pub fn recv(&mut self) -> Value {
        self.ws.recv()
    }

    /// Starts operation `id`.
    pub fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        self.send(&json!({"id": id, "type": "subscribe",
            "payload": {"query": query, "variables": variables}}));
    }

    /// The next message for operation `id` (others' are skipped); panics unless it is
    /// of type `kind`. Returns its payload.
    #[track_caller]
    pub fn expect(&mut self, id: &str, kind: &str) -> Value {
        loop {
            let v = self.recv();
            if v["id"] == id {
                assert_eq!(v["type"], kind, "expected {kind} for {id}, got {v}");
                return v["payload"].clone();
            }
        }
    }

    /// The `data` of the next `next` message for `id`, asserting it has no errors.
    #[track_caller]
    pub fn next_data(&mut self, id: &str) -> Value {
        let p = self.expect(id, "next");
        assert!(p.get("errors").is_none(), "errors in {p}");
        p["data"].clone()
    }

    /// Round trip: a `ping` answered by a `pong` proves everything before it was
    /// handled (the reader answers in order).
    #[track_caller]
    pub fn ping(&mut self) {
        self.send(&json!({"type": "ping"}));
        loop {
            let v = self.recv();
            if v["type"] == "pong" {
                return;
            }
        }
    }

    /// Waits until the subscriptions started so far are live: a query sent after
    /// them is answered after their resolvers ran (the pump starts operations in
    /// order).
    #[track_caller]
    pub fn sync(&mut self) {
        let id = format!("sync{}", unique());
        self.subscribe(&id, "{ __typename }", json!({}));
        self.expect(&id, "next");
        self.expect(&id, "complete");
    }

    /// Reads until the close frame; its code.
    #[track_caller]
    pub fn close_code(&mut self, within: Duration) -> Option<u16> {
        wait_close(&mut self.ws, within)
    }

    /// Asserts nothing arrives for `d`.
    #[track_caller]
    pub fn quiet_for(&mut self, d: Duration) {
        self.ws.stream().set_read_timeout(Some(d)).unwrap();
        match self.ws.ws.read() {
            Err(tungstenite::Error::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            other => panic!("expected silence, got {other:?}"),
        }
        self.ws.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }
}

/// Whether the server closed the connection within `within` (any close, or EOF).
pub fn closed_within(ws: &mut Ws, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let s: &TcpStream = ws.stream();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < deadline {
        match ws.ws.read() {
            Ok(Message::Close(_)) => return true,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}
