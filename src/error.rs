//! The protocol's error codes and the one place every layer's error is mapped to them.
//!
//! Each layer keeps its own error enum ([`crate::store::StoreError`],
//! [`crate::auth::AuthError`]); the `From` impls below are the only translation into
//! the codes and HTTP statuses of docs/reference.md, so REST, the socket and GraphQL
//! all answer the same way.

use crate::auth::AuthError;
use crate::store::StoreError;

/// An error code as sent on the wire (the table in docs/reference.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Malformed input (HTTP 400, 405 and 415 also use this code).
    BadRequest,
    /// Missing, invalid, expired or revoked credentials (401).
    Unauthorized,
    /// Authenticated but not allowed, or banned (403).
    Forbidden,
    /// Unknown route or object (404).
    NotFound,
    /// The object already exists, or the change would break an invariant (409).
    Conflict,
    /// Too many requests (429, with `Retry-After`).
    RateLimited,
    /// A body, frame or message over its limit (413).
    TooLarge,
    /// A fault on our side (500); details go to the log, not the client.
    Internal,
}

impl Code {
    /// The code's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::Conflict => "conflict",
            Code::RateLimited => "rate_limited",
            Code::TooLarge => "too_large",
            Code::Internal => "internal",
        }
    }

    /// The HTTP status the code is answered with by default.
    pub fn http_status(self) -> u16 {
        match self {
            Code::BadRequest => 400,
            Code::Unauthorized => 401,
            Code::Forbidden => 403,
            Code::NotFound => 404,
            Code::Conflict => 409,
            Code::RateLimited => 429,
            Code::TooLarge => 413,
            Code::Internal => 500,
        }
    }
}

/// An error as a client sees it: a code, a human message, and for HTTP a status that
/// may differ from the code's default (405 and 415 are `bad_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The protocol code.
    pub code: Code,
    /// Human-readable text; never contains secrets.
    pub message: String,
    /// HTTP status override (405, 415); `None` means the code's own status.
    pub status: Option<u16>,
    /// Seconds for `Retry-After` on 429 answers.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the code's default status.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    /// Shorthand for [`Code::BadRequest`].
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Code::BadRequest, message)
    }

    /// Shorthand for [`Code::Unauthorized`].
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(Code::Unauthorized, message)
    }

    /// Shorthand for [`Code::Forbidden`].
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(Code::Forbidden, message)
    }

    /// Shorthand for [`Code::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    /// Shorthand for [`Code::Conflict`].
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(Code::Conflict, message)
    }

    /// Shorthand for [`Code::TooLarge`].
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(Code::TooLarge, message)
    }

    /// [`Code::RateLimited`] with the seconds after which a retry may succeed.
    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(Code::RateLimited, message)
        }
    }

    /// A generic internal error; the cause must already be logged.
    pub fn internal() -> Self {
        Self::new(Code::Internal, "internal error")
    }

    /// 405: the path exists but not with this method.
    pub fn method_not_allowed() -> Self {
        ApiError {
            status: Some(405),
            ..Self::bad_request("method not allowed")
        }
    }

    /// 415: a JSON endpoint was given another content type.
    pub fn unsupported_media_type() -> Self {
        ApiError {
            status: Some(415),
            ..Self::bad_request("expected Content-Type: application/json")
        }
    }

    /// The HTTP status to answer with.
    pub fn http_status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.code.http_status())
    }

    /// The HTTP body: `{"error": {"code", "message"}}`.
    pub fn http_body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            StoreError::Conflict(what) => ApiError::conflict(what),
            StoreError::Closed => ApiError::new(Code::Internal, "server is shutting down"),
            StoreError::Full => {
                log::warn!("refused a write: the database is full");
                ApiError::new(
                    Code::Internal,
                    "the server's storage is full; try again later",
                )
            }
            StoreError::Busy => {
                log::warn!("database busy: another process holds its write lock");
                ApiError::new(Code::Internal, "the database is busy; try again")
            }
            StoreError::Panicked | StoreError::Reentrant => {
                log::error!("database write failed: {e}");
                ApiError::internal()
            }
            StoreError::Sqlite(msg) | StoreError::Postgres(msg) => {
                log::error!("database error: {msg}");
                ApiError::internal()
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Banned => ApiError::forbidden("user is banned"),
            AuthError::BadCredentials => ApiError::unauthorized("invalid username or password"),
            AuthError::Store(s) => s.into(),
            AuthError::Hash(msg) => {
                log::error!("password hashing failed: {msg}");
                ApiError::internal()
            }
            other => ApiError::unauthorized(other.to_string()),
        }
    }
}
