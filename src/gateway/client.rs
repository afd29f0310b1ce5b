//! HTTP client of the payment gateway: performs the payment stage's [`Effect`]s.
//!
//! Invariant: every call ends in exactly one [`EffectOutcome`], and nothing the gateway
//! sends can panic it. Only a final refusal is `Rejected` (a 4xx other than 408 and 429);
//! everything that may pass — 408, 429, 5xx, a timeout, a refused connection, a success
//! whose body cannot be read — is `Transient`, so the stage retries with the same
//! idempotency key and the gateway answers the retry from its records instead of charging
//! again.
//!
//! The request bodies are the mock gateway's own wire types, so the two cannot drift.

use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::StatusCode;
use serde::Serialize;

use super::server::{AuthorizeRequest, RefundRequest, VoidRequest};
use crate::config::PaymentSettings;
use crate::runtime::effects::EffectHandler;
use crate::stages::{Effect, EffectOutcome};

pub struct GatewayClient {
    http: reqwest::Client,
    /// `gateway_url` without a trailing slash, or why it is unusable: a bad URL is an
    /// operator's mistake that every call reports (as transient, so no order is declined
    /// for it), rather than a reason for `new`'s caller to fail differently.
    base: Result<String, String>,
    timeout_ms: u64,
}

impl GatewayClient {
    pub fn new(settings: &PaymentSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()?;
        let base = settings.gateway_url.trim_end_matches('/').to_owned();
        let base = match reqwest::Url::parse(&base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(base),
            Ok(url) => Err(format!(
                "payment.gateway_url {base:?} has scheme {:?}, expected http",
                url.scheme()
            )),
            Err(e) => Err(format!("payment.gateway_url {base:?} is not a URL: {e}")),
        };
        if let Err(e) = &base {
            tracing::error!("{e}; every payment call will fail until it is fixed");
        }
        Ok(GatewayClient {
            http,
            base,
            timeout_ms: settings.timeout_ms,
        })
    }
}

impl EffectHandler for GatewayClient {
    fn perform(&self, effect: Effect) -> BoxFuture<'static, EffectOutcome> {
        let base = match &self.base {
            Ok(base) => base.clone(),
            Err(e) => {
                let error = e.clone();
                return Box::pin(async move { EffectOutcome::Transient { error } });
            }
        };
        let (kind, body) = match effect {
            Effect::Authorize {
                idempotency_key,
                store_id,
                order_id,
                amount_cents,
                currency,
                attempt,
            } => (
                Kind::Authorization,
                to_body(AuthorizeRequest {
                    idempotency_key,
                    store_id,
                    order_id,
                    amount_cents,
                    currency,
                    attempt,
                }),
            ),
            Effect::Void {
                idempotency_key,
                store_id,
                order_id,
                attempt: _,
            } => (
                Kind::Void,
                to_body(VoidRequest {
                    idempotency_key,
                    store_id,
                    order_id,
                }),
            ),
            Effect::Refund {
                idempotency_key,
                store_id,
                order_id,
                authorization_id,
                amount_cents,
                currency,
                attempt: _,
            } => (
                Kind::Refund,
                to_body(RefundRequest {
                    idempotency_key,
                    store_id,
                    order_id,
                    authorization_id,
                    amount_cents,
                    currency,
                }),
            ),
        };
        let url = format!("{base}{}", kind.path());
        let request = self.http.post(&url).json(&body);
        let timeout_ms = self.timeout_ms;
        Box::pin(async move {
            let outcome = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    match response.bytes().await {
                        Ok(bytes) => classify(kind, status, &bytes),
                        Err(e) => request_failed(kind, &url, timeout_ms, &e),
                    }
                }
                Err(e) => request_failed(kind, &url, timeout_ms, &e),
            };
            if let EffectOutcome::Transient { error } = &outcome {
                tracing::debug!(%error, "payment gateway call failed transiently");
            }
            outcome
        })
    }
}

fn to_body(request: impl Serialize) -> serde_json::Value {
    // Plain structs of strings and integers always serialize.
    serde_json::to_value(request).unwrap_or_default()
}

/// Which call, for the URL, the ID field of a success and the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Authorization,
    Refund,
    Void,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Authorization => "/v1/authorizations",
            Kind::Refund => "/v1/refunds",
            Kind::Void => "/v1/voids",
        }
    }

    fn id_field(self) -> &'static str {
        match self {
            Kind::Authorization => "authorization_id",
            Kind::Refund => "refund_id",
            // What the void found: `voided` (a charge, now cancelled) or `not_charged`.
            Kind::Void => "status",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Authorization => "authorization",
            Kind::Refund => "refund",
            Kind::Void => "void",
        }
    }
}

/// The outcome of an answer the gateway did send.
fn classify(kind: Kind, status: StatusCode, body: &[u8]) -> EffectOutcome {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    if status.is_success() {
        return match field(kind.id_field()) {
            Some(reference) => EffectOutcome::Succeeded { reference },
            None => EffectOutcome::Transient {
                error: format!(
                    "gateway answered HTTP {status} to the {} without {} in its body: {}",
                    kind.noun(),
                    kind.id_field(),
                    snippet(body)
                ),
            },
        };
    }
    let message = field("reason")
        .or_else(|| field("error"))
        .unwrap_or_else(|| snippet(body));
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if status.is_client_error() && !retryable {
        // A decline's reason is the business answer ("insufficient_funds"); any other
        // refusal says which status it came with.
        let reason = match field("reason") {
            Some(reason) => reason,
            None => format!(
                "gateway refused the {} (HTTP {status}): {message}",
                kind.noun()
            ),
        };
        return EffectOutcome::Rejected { reason };
    }
    EffectOutcome::Transient {
        error: format!(
            "gateway answered HTTP {status} to the {}: {message}",
            kind.noun()
        ),
    }
}

/// The outcome of a call that got no complete answer.
fn request_failed(kind: Kind, url: &str, timeout_ms: u64, e: &reqwest::Error) -> EffectOutcome {
    let error = if e.is_timeout() {
        format!(
            "gateway did not answer the {} within {timeout_ms} ms ({url})",
            kind.noun()
        )
    } else if e.is_connect() {
        format!("cannot connect to the gateway at {url}: {}", chain(e))
    } else {
        format!("{} request to {url} failed: {}", kind.noun(), chain(e))
    };
    EffectOutcome::Transient { error }
}

/// An error and its sources, without repeating a message that a wrapper already shows.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// A body for a message: at most 200 characters of it.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "empty body".into();
    }
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient(o: EffectOutcome) -> String {
        match o {
            EffectOutcome::Transient { error } => error,
            other => panic!("expected transient, got {other:?}"),
        }
    }

    fn rejected(o: EffectOutcome) -> String {
        match o {
            EffectOutcome::Rejected { reason } => reason,
            other => panic!("expected rejected, got {other:?}"),
        }
    }

    #[test]
    fn success_takes_the_reference_from_the_body() {
        let body = br#"{"status":"authorized","authorization_id":"auth_1"}"#;
        assert_eq!(
            classify(Kind::Authorization, StatusCode::CREATED, body),
            EffectOutcome::Succeeded {
                reference: "auth_1".into()
            }
        );
        let body = br#"{"status":"refunded","refund_id":"rf_1","authorization_id":"auth_1"}"#;
        assert_eq!(
            classify(Kind::Refund, StatusCode::OK, body),
            EffectOutcome::Succeeded {
                reference: "rf_1".into()
            }
        );
    }

    #[test]
    fn success_without_a_readable_reference_is_transient() {
        let e = transient(classify(
            Kind::Authorization,
            StatusCode::CREATED,
            b"<html>",
        ));
        assert!(
            e.contains("without authorization_id") && e.contains("<html>"),
            "{e}"
        );
        let e = transient(classify(Kind::Refund, StatusCode::CREATED, b""));
        assert!(e.contains("refund_id") && e.contains("empty body"), "{e}");
        // The other call's ID is not this call's reference.
        let body = br#"{"authorization_id":"auth_1"}"#;
        transient(classify(Kind::Refund, StatusCode::CREATED, body));
        transient(classify(
            Kind::Authorization,
            StatusCode::OK,
            br#"{"authorization_id":42}"#,
        ));
        transient(classify(
            Kind::Authorization,
            StatusCode::OK,
            br#"{"authorization_id":""}"#,
        ));
    }

    #[test]
    fn a_decline_is_rejected_with_its_reason() {
        let body = br#"{"status":"declined","reason":"insufficient_funds"}"#;
        assert_eq!(
            rejected(classify(
                Kind::Authorization,
                StatusCode::PAYMENT_REQUIRED,
                body
            )),
            "insufficient_funds"
        );
    }

    #[test]
    fn other_client_errors_are_rejected_with_status_and_message() {
        let body = br#"{"error":"idempotency key \"k\" was first used for order o-1"}"#;
        let r = rejected(classify(Kind::Authorization, StatusCode::CONFLICT, body));
        assert!(
            r.contains("409 Conflict") && r.contains("first used for order o-1"),
            "{r}"
        );
        let r = rejected(classify(
            Kind::Refund,
            StatusCode::NOT_FOUND,
            b"no such thing",
        ));
        assert!(
            r.contains("refund") && r.contains("404") && r.contains("no such thing"),
            "{r}"
        );
        let r = rejected(classify(
            Kind::Refund,
            StatusCode::UNPROCESSABLE_ENTITY,
            b"",
        ));
        assert!(r.contains("422") && r.contains("empty body"), "{r}");
    }

    #[test]
    fn timeouts_throttling_and_server_errors_are_transient() {
        for status in [
            StatusCode::REQUEST_TIMEOUT,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            let e = transient(classify(
                Kind::Authorization,
                status,
                br#"{"error":"busy"}"#,
            ));
            assert!(e.contains(status.as_str()) && e.contains("busy"), "{e}");
        }
        // Not a final answer either: a redirect that was not followed.
        transient(classify(Kind::Authorization, StatusCode::FOUND, b""));
    }

    #[test]
    fn long_bodies_are_cut() {
        let body = "x".repeat(1_000);
        let e = transient(classify(
            Kind::Authorization,
            StatusCode::BAD_GATEWAY,
            body.as_bytes(),
        ));
        assert!(e.len() < 300, "{e}");
        assert!(e.ends_with('…'));
    }

    #[test]
    fn a_bad_gateway_url_fails_every_call_transiently() {
        for url in ["not a url", "ftp://127.0.0.1:1"] {
            let settings = PaymentSettings {
                gateway_url: url.into(),
                ..PaymentSettings::default()
            };
            let client = GatewayClient::new(&settings).expect("client builds");
            let effect = Effect::Refund {
                idempotency_key: "k".into(),
                store_id: "s".into(),
                order_id: "o".into(),
                authorization_id: "a".into(),
                amount_cents: 1,
                currency: "USD".into(),
                attempt: 1,
            };
            let outcome = futures::executor::block_on(client.perform(effect));
            let e = transient(outcome);
            assert!(e.contains("payment.gateway_url"), "{e}");
        }
    }
}
