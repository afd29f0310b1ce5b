//! The API's one error shape: `{"error": {"code", "message", "field"?}}`, whatever failed
//! — a handler, a header, the body, the route itself.
//!
//! Invariant: every non-2xx answer of the API is an [`ApiError`]; codes are stable
//! snake_case words a client can match on, messages are for people.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::events::codec::DecodeError;
use crate::sql::SqlError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The request field (body path, header, query or path parameter) at fault.
    pub field: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// A request value that is malformed (400), naming it.
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", message).with_field(field)
    }

    /// A well-formed body that breaks a rule of the contract (422), naming the field.
    pub fn invalid_field(field: Option<String>, message: impl Into<String>) -> Self {
        let mut e = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message);
        e.field = field;
        e
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// The JSON body this error answers with.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        })
        .expect("an error body serializes")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<SqlError> for ApiError {
    fn from(e: SqlError) -> Self {
        match e {
            SqlError::UnknownAlert { .. } => ApiError::not_found("alert_not_found", e.to_string()),
            SqlError::AlreadyResolved { .. } => {
                ApiError::conflict("alert_already_resolved", e.to_string())
            }
            other => {
                tracing::warn!(error = %other, "database error answering an API request");
                ApiError::unavailable("database_unavailable", other.to_string())
            }
        }
    }
}

impl From<DecodeError> for ApiError {
    /// A body the codec refuses: a rule of the contract (422, naming the field), or not
    /// an event at all (400).
    fn from(e: DecodeError) -> Self {
        match &e {
            DecodeError::Invalid { field, .. } => {
                ApiError::invalid_field(field.clone(), e.to_string())
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shape_with_and_without_a_field() {
        let e = ApiError::bad_request("limit", "limit must be 1 to 500");
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {"code": "invalid_parameter", "message": "limit must be 1 to 500", "field": "limit"}})
        );
        let e = ApiError::not_found("order_not_found", "no such order");
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {"code": "order_not_found", "message": "no such order"}})
        );
    }
}
