//! `POST /graphql` and `GET /graphql?query=`: one operation per request, answered in
//! the GraphQL-over-HTTP way.
//!
//! [`crate::http`] has already authenticated the caller and, for a POST, read the
//! body (64 KiB at most: 413) and checked it is JSON (415), so those refusals, like
//! 401 and 403, have the REST shape. Here: a malformed request body is 400; a document
//! that does not parse, validate or fit the [`limits`] gets `{"errors": [...]}` with
//! 200 for `application/json` clients and 400 for those that accept
//! `application/graphql-response+json`; a mutation over GET is 405; a mutation whose
//! root fields would pass the caller's write budget is 429. Anything that executes is
//! 200 with `data` (and `errors` with `extensions.code` for resolvers that failed).
//! Runs on the HTTP worker that took the request.

use super::limits::{self, Checked};
use super::{block_on, charge_writes, schema, Gql};
use crate::actions::Actor;
use crate::app::App;
use crate::error::ApiError;
use crate::request::{header_value, query_param, Reply};
use async_graphql::parser::types::OperationType;
use async_graphql::{Response, ServerError, Variables};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tiny_http::Request;

/// A GraphQL request's fields (a POST body, a GET's parameters, a socket's
/// `subscribe` payload).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Body {
    query: String,
    #[serde(default)]
    operation_name: Option<String>,
    #[serde(default)]
    variables: Option<Value>,
}

impl Body {
    /// The request to execute; `variables` must be an object (or absent, or null).
    pub fn into_request(self) -> Result<async_graphql::Request, ApiError> {
        let mut rq = async_graphql::Request::new(self.query);
        if let Some(name) = self.operation_name {
            rq = rq.operation_name(name);
        }
        match self.variables {
            None | Some(Value::Null) => Ok(rq),
            Some(v @ Value::Object(_)) => Ok(rq.variables(Variables::from_json(v))),
            Some(_) => Err(ApiError::bad_request("`variables` must be an object")),
        }
    }
}

/// Which response type the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Media {
    /// `application/json`, the default: request errors are 200.
    Json,
    /// `application/graphql-response+json`: request errors are 400.
    GraphQl,
}

impl Media {
    /// From `Accept`: the GraphQL type if it is acceptable and not less preferred than
    /// plain JSON.
    fn of(rq: &Request) -> Media {
        let accept = header_value(rq, "Accept").unwrap_or("");
        let quality = |wanted: &str| -> f32 {
            accept
                .split(',')
                .filter_map(|item| {
                    let mut parts = item.split(';').map(str::trim);
                    let mime = parts.next()?;
                    if !mime.eq_ignore_ascii_case(wanted) {
                        return None;
                    }
                    let q = parts
                        .filter_map(|p| p.strip_prefix("q="))
                        .find_map(|q| q.parse::<f32>().ok())
                        .unwrap_or(1.0);
                    Some(q)
                })
                .fold(0.0, f32::max)
        };
        let graphql = quality("application/graphql-response+json");
        if graphql > 0.0 && graphql >= quality("application/json") {
            Media::GraphQl
        } else {
            Media::Json
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Media::Json => "application/json",
            Media::GraphQl => "application/graphql-response+json",
        }
    }
}

/// `POST /graphql` with the body already read.
pub fn post(app: &Arc<App>, rq: &Request, actor: Actor, raw: &[u8]) -> Result<Reply, ApiError> {
    let body: Body = serde_json::from_slice(raw)
        .map_err(|e| ApiError::bad_request(format!("invalid GraphQL request: {e}")))?;
    run(app, actor, body.into_request()?, Media::of(rq), false)
}

/// `GET /graphql?query=...&variables=...&operationName=...` (queries only).
pub fn get(app: &Arc<App>, rq: &Request, actor: Actor) -> Result<Reply, ApiError> {
    let url = rq.url();
    let query = query_param(url, "query")
        .ok_or_else(|| ApiError::bad_request("missing the `query` parameter"))?;
    let max = app.cfg.max_body_bytes;
    if query.len() > max {
        return Err(ApiError::too_large(format!("query is over {max} bytes")));
    }
    let variables = query_param(url, "variables")
        .map(|v| serde_json::from_str(&v))
        .transpose()
        .map_err(|e| ApiError::bad_request(format!("`variables` is not JSON: {e}")))?;
    let body = Body {
        query,
        operation_name: query_param(url, "operationName"),
        variables,
    };
    run(app, actor, body.into_request()?, Media::of(rq), true)
}

fn run(
    app: &Arc<App>,
    actor: Actor,
    mut request: async_graphql::Request,
    media: Media,
    over_get: bool,
) -> Result<Reply, ApiError> {
    let Checked { kind, root_fields } = match limits::check(&mut request) {
        Ok(checked) => checked,
        Err(errors) => return Ok(request_errors(&errors, media)),
    };
    if over_get && kind != OperationType::Query {
        let e = ApiError::method_not_allowed();
        return Ok(Reply::error(&e).header("Allow", "POST"));
    }
    if kind == OperationType::Mutation {
        charge_writes(app, &actor, root_fields)?;
    }
    let request = request.data(Gql {
        app: app.clone(),
        actor,
        peer: None,
    });
    let response = block_on(schema().execute(request));
    Ok(answer(&response, media))
}

/// Whether a response is a request error: nothing executed (no data) and no error
/// comes from a resolver (they carry a path).
pub fn is_request_error(response: &Response) -> bool {
    response.data == async_graphql::Value::Null
        && !response.errors.is_empty()
        && response.errors.iter().all(|e| e.path.is_empty())
}

fn answer(response: &Response, media: Media) -> Reply {
    if is_request_error(response) {
        return request_errors(&response.errors, media);
    }
    match serde_json::to_vec(response) {
        Ok(body) => Reply::bytes(200, media.content_type(), body),
        Err(e) => {
            log::error!("could not encode a GraphQL response: {e}");
            Reply::error(&ApiError::internal())
        }
    }
}

/// A request error: `{"errors": [...]}` without `data`.
fn request_errors(errors: &[ServerError], media: Media) -> Reply {
    let status = match media {
        Media::Json => 200,
        Media::GraphQl => 400,
    };
    let body = json!({ "errors": errors }).to_string().into_bytes();
    Reply::bytes(status, media.content_type(), body)
}
