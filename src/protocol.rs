//! The socket's wire format: client frames parsed into [`ClientMsg`], server events
//! rendered as JSON text with a `type` field.

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A client → server frame (docs/socket.md, "Frames").
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMsg {
    /// Join a room, optionally replaying everything after message `since`.
    Join {
        /// Room name.
        room: String,
        /// Last message id the client saw.
        since: Option<i64>,
        /// `"batch"` for `presence_batch` frames, `"count"` for `presence_count`
        /// frames; absent (or `"each"`) for one `presence` frame per change.
        presence: Option<PresenceChoice>,
    },
    /// Leave a room.
    Leave {
        /// Room name.
        room: String,
    },
    /// Post to a joined room.
    Send {
        /// Room name.
        room: String,
        /// Text.
        body: String,
        /// Once-only key: a repeat is acked with the first message's id.
        client_id: Option<String>,
    },
    /// Direct message.
    Dm {
        /// Recipient username.
        to: String,
        /// Text.
        body: String,
        /// Once-only key, as for `send`.
        client_id: Option<String>,
    },
    /// A page of a room's history.
    History {
        /// Room name.
        room: String,
        /// Only ids below.
        before: Option<i64>,
        /// Only ids above.
        after: Option<i64>,
        /// Page size (1–200).
        limit: Option<i64>,
    },
    /// A page of the users online in a room.
    Online {
        /// Room name.
        room: String,
        /// Only names after this one.
        after: Option<String>,
        /// Page size (1–1000).
        limit: Option<i64>,
    },
    /// Delete a message (`message.delete`).
    Delete {
        /// Message id.
        id: i64,
    },
    /// Close a user's sockets (`user.kick`).
    Kick {
        /// Username.
        user: String,
    },
    /// Announce to everyone or to holders of `roles` (`announce`).
    Announce {
        /// Text.
        body: String,
        /// Only users holding one of these roles.
        roles: Option<Vec<String>>,
    },
    /// Re-authenticate with a newer access token.
    Refresh {
        /// The new token.
        access_token: String,
    },
    /// Liveness check.
    Ping,
}

/// How a joining socket wants to hear presence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceChoice {
    /// One `presence` frame per change.
    #[default]
    Each,
    /// Coalesced `presence_batch` frames.
    Batch,
    /// Coalesced `presence_count` frames, and no names in `joined`.
    Count,
}

/// Parses a text frame; on failure returns the error to send, with the echoed `ref`.
pub fn parse(text: &str) -> Result<(ClientMsg, Value), (ApiError, Value)> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        (
            ApiError::bad_request(format!("invalid JSON: {e}")),
            Value::Null,
        )
    })?;
    let reference = value.get("ref").cloned().unwrap_or(Value::Null);
    if !value.is_object() {
        return Err((
            ApiError::bad_request("a frame must be a JSON object"),
            reference,
        ));
    }
    match value.get("type") {
        Some(Value::String(_)) => {}
        Some(_) => return Err((ApiError::bad_request("`type` must be a string"), reference)),
        None => return Err((ApiError::bad_request("missing field `type`"), reference)),
    }
    match ClientMsg::deserialize(value) {
        Ok(msg) => Ok((msg, reference)),
        Err(e) => Err((ApiError::bad_request(e.to_string()), reference)),
    }
}

/// `{"type": kind, ...fields of body}` as JSON text.
pub fn event<T: Serialize>(kind: &str, body: &T) -> String {
    let mut v = serde_json::to_value(body).unwrap_or(Value::Null);
    match v.as_object_mut() {
        Some(map) => {
            map.insert("type".into(), Value::String(kind.into()));
        }
        None => v = serde_json::json!({ "type": kind }),
    }
    v.to_string()
}

/// The socket form of an error.
pub fn error_event(e: &ApiError, reference: &Value) -> String {
    serde_json::json!({
        "type": "error",
        "code": e.code.as_str(),
        "message": e.message,
        "ref": reference,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    #[test]
    fn parse_reports_each_kind_of_bad_input() {
        let cases = [
            ("not json", "invalid JSON"),
            ("[1]", "JSON object"),
            (r#"{"room":"x"}"#, "missing field `type`"),
            (r#"{"type":5}"#, "must be a string"),
            (r#"{"type":"fly"}"#, "unknown variant"),
            (r#"{"type":"join"}"#, "missing field `room`"),
            (r#"{"type":"join","room":7}"#, "invalid type"),
        ];
        for (input, expect) in cases {
            let (e, _) = parse(input).unwrap_err();
            assert_eq!(e.code, Code::BadRequest);
            assert!(e.message.contains(expect), "{input}: {}", e.message);
        }
        let (_, r) = parse(r#"{"type":"fly","ref":"a1"}"#).unwrap_err();
        assert_eq!(r, Value::String("a1".into()));
        assert!(matches!(
            parse(r#"{"type":"ping"}"#),
            Ok((ClientMsg::Ping, Value::Null))
        ));
    }

    #[test]
    fn event_adds_type() {
        let v: Value = serde_json::from_str(&event("x", &serde_json::json!({"a": 1}))).unwrap();
        assert_eq!(v, serde_json::json!({"type": "x", "a": 1}));
    }
}
