//! The mock payment gateway and its client, over real HTTP on loopback.
//!
//! Invariant: every test starts its own gateway (in-process, port 0) and stops it when the
//! test ends, so tests run in parallel without sharing a ledger. Assertions are exact:
//! the whole ledger, every counter, the same authorization ID on a replay. Time-based
//! behaviour (outage windows, timestamps) runs on a manual clock; one test checks a real
//! window with generous margins, and the timeout tests use a slow gateway because the
//! client's timeout is wall-clock by nature.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow::config::PaymentSettings;
use orderflow::gateway::client::GatewayClient;
use orderflow::gateway::server::{
    self, EndpointStats, Gateway, GatewayConfig, LedgerEntry, LedgerStatus, OutageStatus,
    REPLAYED_HEADER, RefundEntry, Stats,
};
use orderflow::runtime::clock::ManualClock;
use orderflow::runtime::effects::EffectHandler;
use orderflow::stages::{Effect, EffectOutcome};
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};

const STORE: &str = "store-1";
/// 1970-01-01T00:16:40Z: the manual clock's start, so timestamps are exact.
const T0: i64 = 1_000_000;

struct Harness {
    gateway: Gateway,
    base: String,
    http: reqwest::Client,
    _stop: DropGuard,
}

/// One answer of the gateway.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    replayed: bool,
}

impl Answer {
    fn str(&self, field: &str) -> String {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {self:?}"))
            .to_owned()
    }
}

async fn start(config: GatewayConfig) -> Harness {
    start_gateway(Gateway::new(config).expect("valid config")).await
}

async fn start_with_clock(config: GatewayConfig, clock: &ManualClock) -> Harness {
    let gateway = Gateway::with_clock(config, Arc::new(clock.clone())).expect("valid config");
    start_gateway(gateway).await
}

async fn start_gateway(gateway: Gateway) -> Harness {
    let shutdown = CancellationToken::new();
    let (addr, _task) = server::serve_gateway("127.0.0.1:0", gateway.clone(), shutdown.clone())
        .await
        .expect("binding port 0");
    Harness {
        gateway,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        _stop: shutdown.drop_guard(),
    }
}

impl Harness {
    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("the gateway answers");
        let status = response.status().as_u16();
        let replayed = response.headers().get(REPLAYED_HEADER).is_some();
        let text = response.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            body,
            replayed,
        }
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn authorize(&self, key: &str, order: &str, amount_cents: i64, attempt: u32) -> Answer {
        self.post(
            "/v1/authorizations",
            json!({
                "idempotency_key": key, "store_id": STORE, "order_id": order,
                "amount_cents": amount_cents, "currency": "USD", "attempt": attempt,
            }),
        )
        .await
    }

    async fn refund(&self, key: &str, order: &str, authorization_id: &str, amount: i64) -> Answer {
        self.post(
            "/v1/refunds",
            json!({
                "idempotency_key": key, "store_id": STORE, "order_id": order,
                "authorization_id": authorization_id, "amount_cents": amount, "currency": "USD",
            }),
        )
        .await
    }

    /// The ledger over HTTP, checked against the in-process one.
    async fn ledger(&self) -> Vec<LedgerEntry> {
        let answer = self.get("/v1/ledger").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let ledger: Vec<LedgerEntry> =
            serde_json::from_value(answer.body).expect("a ledger in the documented shape");
        assert_eq!(ledger, self.gateway.ledger());
        ledger
    }

    async fn stats(&self) -> Stats {
        let answer = self.get("/v1/stats").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let stats: Stats = serde_json::from_value(answer.body).expect("stats");
        assert_eq!(stats, self.gateway.stats());
        stats
    }

    fn client(&self, timeout_ms: u64) -> GatewayClient {
        client_for(&self.base, timeout_ms)
    }
}

fn client_for(url: &str, timeout_ms: u64) -> GatewayClient {
    GatewayClient::new(&PaymentSettings {
        gateway_url: url.to_owned(),
        timeout_ms,
        ..PaymentSettings::default()
    })
    .expect("client builds")
}

fn authorize_effect(key: &str, order: &str, amount_cents: i64, attempt: u32) -> Effect {
    Effect::Authorize {
        idempotency_key: key.into(),
        store_id: STORE.into(),
        order_id: order.into(),
        amount_cents,
        currency: "USD".into(),
        attempt,
    }
}

fn refund_effect(key: &str, order: &str, authorization_id: &str, amount_cents: i64) -> Effect {
    Effect::Refund {
        idempotency_key: key.into(),
        store_id: STORE.into(),
        order_id: order.into(),
        authorization_id: authorization_id.into(),
        amount_cents,
        currency: "USD".into(),
        attempt: 1,
    }
}

fn transient(outcome: EffectOutcome) -> String {
    match outcome {
        EffectOutcome::Transient { error } => error,
        other => panic!("expected Transient, got {other:?}"),
    }
}

fn rejected(outcome: EffectOutcome) -> String {
    match outcome {
        EffectOutcome::Rejected { reason } => reason,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

fn succeeded(outcome: EffectOutcome) -> String {
    match outcome {
        EffectOutcome::Succeeded { reference } => reference,
        other => panic!("expected Succeeded, got {other:?}"),
    }
}

/// The ledger entry of a fresh authorization, at the manual clock's start.
fn authorized_entry(authorization_id: &str, key: &str, order: &str, amount: i64) -> LedgerEntry {
    LedgerEntry {
        authorization_id: Some(authorization_id.into()),
        idempotency_key: key.into(),
        store_id: STORE.into(),
        order_id: order.into(),
        amount_cents: amount,
        currency: "USD".into(),
        status: LedgerStatus::Authorized,
        decline_reason: None,
        first_attempt: 1,
        attempts_seen: 1,
        created_at: "1970-01-01T00:16:40.000Z".into(),
        refund: None,
    }
}

// ---------------------------------------------------------------- the gateway itself

#[tokio::test]
async fn the_same_key_twice_charges_once() {
    let clock = ManualClock::new(T0);
    let gw = start_with_clock(GatewayConfig::default(), &clock).await;
    let first = gw.authorize("o-1/pay", "o-1", 1999, 1).await;
    assert_eq!((first.status, first.replayed), (201, false), "{first:?}");
    assert_eq!(first.str("status"), "authorized");
    let id = first.str("authorization_id");
    assert!(id.starts_with("auth_"), "{id}");

    clock.advance(5_000);
    let second = gw.authorize("o-1/pay", "o-1", 1999, 2).await;
    assert_eq!((second.status, second.replayed), (201, true), "{second:?}");
    assert_eq!(
        second.body, first.body,
        "a replay is the first answer, byte for byte"
    );

    let mut expected = authorized_entry(&id, "o-1/pay", "o-1", 1999);
    expected.attempts_seen = 2;
    assert_eq!(gw.ledger().await, vec![expected]);
    let stats = gw.stats().await;
    assert_eq!(
        stats.authorizations,
        EndpointStats {
            succeeded: 1,
            replayed: 1,
            ..EndpointStats::default()
        }
    );
}

#[tokio::test]
async fn concurrent_duplicates_charge_once() {
    let gw = start(GatewayConfig {
        jitter_ms: 20,
        ..GatewayConfig::default()
    })
    .await;
    let answers =
        futures::future::join_all((1..=32).map(|attempt| gw.authorize("k", "o-1", 500, attempt)))
            .await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 201, "{a:?}");
            a.str("authorization_id")
        })
        .collect();
    assert_eq!(ids.len(), 1, "one key, one authorization: {ids:?}");
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    let ledger = gw.ledger().await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].attempts_seen, 32);
    assert_eq!(ledger[0].authorization_id.as_ref(), ids.first());
}

#[tokio::test]
async fn declines_are_decided_once_per_key_and_agree_across_restarts() {
    let config = GatewayConfig {
        decline_rate: 0.5,
        seed: 7,
        ..GatewayConfig::default()
    };
    let keys: Vec<String> = (0..40).map(|i| format!("o-{i}/pay")).collect();
    let mut runs = Vec::new();
    for _restart in 0..2 {
        let gw = start(config.clone()).await;
        let mut declined = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let order = format!("o-{i}");
            let a = gw.authorize(key, &order, 100, 1).await;
            let b = gw.authorize(key, &order, 100, 2).await;
            assert_eq!((a.status, &a.body), (b.status, &b.body), "{key}");
            assert!(b.replayed);
            match a.status {
                402 => {
                    assert_eq!(a.str("status"), "declined");
                    assert_eq!(
                        Some(a.str("reason").as_str()),
                        config.decline_reason(key),
                        "{key}"
                    );
                    declined.push(key.clone());
                }
                201 => assert_eq!(config.decline_reason(key), None, "{key}"),
                other => panic!("unexpected {other} for {key}: {a:?}"),
            }
        }
        assert!(
            (5..=35).contains(&declined.len()),
            "about half of 40 keys: {declined:?}"
        );
        let ledger = gw.ledger().await;
        assert_eq!(ledger.len(), keys.len());
        let in_ledger: Vec<String> = ledger
            .iter()
            .filter(|e| e.status == LedgerStatus::Declined)
            .map(|e| {
                assert_eq!(e.authorization_id, None, "a decline charges nothing");
                assert!(e.decline_reason.is_some());
                e.idempotency_key.clone()
            })
            .collect();
        assert_eq!(in_ledger, declined);

        // The first answer stands even when the knobs change: no key flips.
        gw.gateway
            .set_config(GatewayConfig {
                decline_rate: 0.0,
                ..config.clone()
            })
            .expect("valid config");
        let again = gw.authorize(&declined[0], "o-x", 100, 3).await;
        assert_eq!(
            again.status, 409,
            "another order on a declined key: {again:?}"
        );
        let order = declined[0].trim_end_matches("/pay");
        let again = gw.authorize(&declined[0], order, 100, 3).await;
        assert_eq!((again.status, again.replayed), (402, true), "{again:?}");
        runs.push(declined);
    }
    assert_eq!(runs[0], runs[1], "the same seed declines the same keys");
}

#[tokio::test]
async fn transient_errors_are_not_recorded_and_the_retry_succeeds() {
    let gw = start(GatewayConfig {
        transient_error_rate: 1.0,
        ..GatewayConfig::default()
    })
    .await;
    for attempt in 1..=3 {
        let a = gw.authorize("k", "o-1", 700, attempt).await;
        assert_eq!(a.status, 503, "{a:?}");
        assert!(a.str("error").contains("nothing was recorded"), "{a:?}");
    }
    let r = gw.refund("r", "o-1", "auth_x", 700).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(gw.ledger().await, vec![]);

    // Knobs change over HTTP too.
    let put = gw
        .send(
            gw.http
                .put(format!("{}/admin/config", gw.base))
                .json(&json!({"transient_error_rate": 0.0})),
        )
        .await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(put.body["transient_error_rate"], json!(0.0));
    let bad = gw
        .send(
            gw.http
                .put(format!("{}/admin/config", gw.base))
                .json(&json!({"decline_rate": 3.0})),
        )
        .await;
    assert_eq!(bad.status, 422, "{bad:?}");
    assert!(bad.str("error").contains("decline_rate"), "{bad:?}");

    let a = gw.authorize("k", "o-1", 700, 4).await;
    assert_eq!((a.status, a.replayed), (201, false), "{a:?}");
    let ledger = gw.ledger().await;
    assert_eq!(ledger.len(), 1);
    assert_eq!((ledger[0].first_attempt, ledger[0].attempts_seen), (4, 1));
    let stats = gw.stats().await;
    assert_eq!(
        stats.authorizations,
        EndpointStats {
            succeeded: 1,
            transient: 3,
            ..EndpointStats::default()
        }
    );
    assert_eq!(stats.refunds.transient, 1);
}

#[tokio::test]
async fn the_outage_switch_refuses_everything_without_touching_state() {
    let gw = start(GatewayConfig::default()).await;
    let a = gw.authorize("k1", "o-1", 100, 1).await;
    assert_eq!(a.status, 201);
    let id = a.str("authorization_id");

    let on = gw.post("/admin/outage", json!({"on": true})).await;
    assert_eq!(on.status, 200, "{on:?}");
    let status: OutageStatus = serde_json::from_value(gw.get("/admin/outage").await.body).unwrap();
    assert!(status.on && status.active, "{status:?}");

    for answer in [
        gw.authorize("k1", "o-1", 100, 2).await,
        gw.authorize("k2", "o-2", 200, 1).await,
        gw.refund("r1", "o-1", &id, 100).await,
    ] {
        assert_eq!(answer.status, 503, "{answer:?}");
        assert!(answer.str("error").contains("outage"), "{answer:?}");
    }
    let ledger = gw.ledger().await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].attempts_seen, 1, "a refused replay is not seen");
    assert_eq!(ledger[0].status, LedgerStatus::Authorized);
    assert_eq!(gw.get("/health").await.status, 200, "health is not payment");

    let off = gw.post("/admin/outage", json!({"on": false})).await;
    assert_eq!(off.body["active"], json!(false), "{off:?}");
    let b = gw.authorize("k2", "o-2", 200, 2).await;
    assert_eq!((b.status, b.replayed), (201, false), "{b:?}");
    let stats = gw.stats().await;
    assert_eq!((stats.authorizations.outage, stats.refunds.outage), (2, 1));
    assert_eq!(stats.authorizations.succeeded, 2);
}

#[tokio::test]
async fn outage_windows_follow_the_clock() {
    let clock = ManualClock::new(T0);
    let config = GatewayConfig {
        outages: vec!["1s..2s".parse().unwrap(), "5s..6s".parse().unwrap()],
        ..GatewayConfig::default()
    };
    let gw = start_with_clock(config, &clock).await;
    let at = |ms: i64| clock.set(T0 + ms);

    at(999);
    assert_eq!(gw.authorize("k1", "o-1", 100, 1).await.status, 201);
    at(1_000);
    assert_eq!(gw.authorize("k2", "o-2", 100, 1).await.status, 503);
    let status: OutageStatus = serde_json::from_value(gw.get("/admin/outage").await.body).unwrap();
    assert_eq!(
        (status.on, status.active, status.elapsed_ms),
        (false, true, 1_000)
    );
    assert_eq!(
        status
            .windows
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["1s..2s", "5s..6s"]
    );
    at(1_999);
    assert_eq!(gw.authorize("k2", "o-2", 100, 2).await.status, 503);
    at(2_000);
    assert_eq!(gw.authorize("k2", "o-2", 100, 3).await.status, 201);
    at(5_500);
    assert_eq!(gw.authorize("k3", "o-3", 100, 1).await.status, 503);
    at(6_000);
    assert_eq!(gw.authorize("k3", "o-3", 100, 2).await.status, 201);

    let ledger = gw.ledger().await;
    let summary: Vec<_> = ledger
        .iter()
        .map(|e| {
            (
                e.idempotency_key.as_str(),
                e.first_attempt,
                e.created_at.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("k1", 1, "1970-01-01T00:16:40.999Z"),
            ("k2", 3, "1970-01-01T00:16:42.000Z"),
            ("k3", 2, "1970-01-01T00:16:46.000Z"),
        ]
    );
    assert_eq!(gw.stats().await.authorizations.outage, 3);
}

#[tokio::test]
async fn an_outage_window_in_real_time() {
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let config = GatewayConfig {
        outages: vec!["0s..800ms".parse().unwrap()],
        ..GatewayConfig::default()
    };
    let (addr, _) = server::serve("127.0.0.1:0", config, shutdown)
        .await
        .unwrap();
    let client = client_for(&format!("http://{addr}"), 2_000);
    let error = transient(client.perform(authorize_effect("k", "o-1", 100, 1)).await);
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "too slow to land in the window"
    );
    assert!(
        error.contains("503") && error.contains("scheduled window 0s..800ms"),
        "{error}"
    );
    tokio::time::sleep_until((started + Duration::from_millis(1_000)).into()).await;
    succeeded(client.perform(authorize_effect("k", "o-1", 100, 2)).await);
}

#[tokio::test]
async fn an_authorization_is_refunded_once() {
    let clock = ManualClock::new(T0);
    let gw = start_with_clock(GatewayConfig::default(), &clock).await;
    let id = gw
        .authorize("o-1/pay", "o-1", 2500, 1)
        .await
        .str("authorization_id");

    clock.advance(60_000);
    let first = gw.refund("o-1/refund", "o-1", &id, 2500).await;
    assert_eq!((first.status, first.replayed), (201, false), "{first:?}");
    assert_eq!(first.str("status"), "refunded");
    assert_eq!(first.str("authorization_id"), id);
    let refund_id = first.str("refund_id");
    let again = gw.refund("o-1/refund", "o-1", &id, 2500).await;
    assert_eq!((again.status, again.replayed), (201, true));
    assert_eq!(again.body, first.body);

    let other_key = gw.refund("o-1/refund-2", "o-1", &id, 2500).await;
    assert_eq!(other_key.status, 409, "{other_key:?}");
    assert!(other_key.str("error").contains(&refund_id), "{other_key:?}");

    let mut expected = authorized_entry(&id, "o-1/pay", "o-1", 2500);
    expected.status = LedgerStatus::Refunded;
    expected.refund = Some(RefundEntry {
        refund_id,
        idempotency_key: "o-1/refund".into(),
        amount_cents: 2500,
        attempts_seen: 2,
        created_at: "1970-01-01T00:17:40.000Z".into(),
    });
    assert_eq!(gw.ledger().await, vec![expected]);
    assert_eq!(
        gw.stats().await.refunds,
        EndpointStats {
            succeeded: 1,
            replayed: 1,
            conflict: 1,
            ..EndpointStats::default()
        }
    );
}

#[tokio::test]
async fn refunds_of_what_was_not_charged_are_refused() {
    let gw = start(GatewayConfig::default()).await;
    let id = gw
        .authorize("k", "o-1", 1000, 1)
        .await
        .str("authorization_id");

    let unknown = gw.refund("r1", "o-1", "auth_nope", 1000).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(unknown.str("error").contains("auth_nope"));
    let partial = gw.refund("r2", "o-1", &id, 999).await;
    assert_eq!(partial.status, 422, "{partial:?}");
    assert!(partial.str("error").contains("whole charge"), "{partial:?}");
    let other_order = gw.refund("r3", "o-2", &id, 1000).await;
    assert_eq!(other_order.status, 422, "{other_order:?}");

    // Refusals are not recorded: a corrected request with the same key goes through.
    let ok = gw.refund("r2", "o-1", &id, 1000).await;
    assert_eq!((ok.status, ok.replayed), (201, false), "{ok:?}");
    // A refund key reused for another authorization is a conflict.
    let id2 = gw
        .authorize("k2", "o-2", 1000, 1)
        .await
        .str("authorization_id");
    let reused = gw.refund("r2", "o-2", &id2, 1000).await;
    assert_eq!(reused.status, 409, "{reused:?}");
    assert!(
        reused.str("error").contains("was first used to refund"),
        "{reused:?}"
    );

    let statuses: Vec<_> = gw.ledger().await.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [LedgerStatus::Refunded, LedgerStatus::Authorized]);
    assert_eq!(
        gw.stats().await.refunds,
        EndpointStats {
            succeeded: 1,
            conflict: 1,
            not_found: 1,
            invalid: 2,
            ..EndpointStats::default()
        }
    );
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_a_conflict() {
    let gw = start(GatewayConfig::default()).await;
    let first = gw.authorize("k", "o-1", 1000, 1).await;
    assert_eq!(first.status, 201);
    let more = gw.authorize("k", "o-1", 2000, 2).await;
    assert_eq!(more.status, 409, "{more:?}");
    let message = more.str("error");
    assert!(
        message.contains("1000 USD") && message.contains("2000 USD"),
        "{message}"
    );
    let other = gw.authorize("k", "o-2", 1000, 2).await;
    assert_eq!(other.status, 409, "{other:?}");
    assert!(other.str("error").contains("order o-2"), "{other:?}");

    let ledger = gw.ledger().await;
    assert_eq!(ledger.len(), 1);
    assert_eq!((ledger[0].amount_cents, ledger[0].attempts_seen), (1000, 1));
    assert_eq!(gw.stats().await.authorizations.conflict, 2);
}

#[tokio::test]
async fn malformed_requests_are_refused_and_not_recorded() {
    let gw = start(GatewayConfig::default()).await;
    let not_json = gw
        .send(
            gw.http
                .post(format!("{}/v1/authorizations", gw.base))
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_eq!(not_json.status, 400, "{not_json:?}");
    assert!(not_json.body["error"].is_string(), "{not_json:?}");
    let missing = gw
        .post("/v1/authorizations", json!({"idempotency_key": "k"}))
        .await;
    assert_eq!(missing.status, 422, "{missing:?}");
    assert!(missing.str("error").contains("store_id"), "{missing:?}");
    let zero = gw.authorize("k", "o-1", 0, 1).await;
    assert_eq!(zero.status, 422, "{zero:?}");
    let currency = gw
        .post(
            "/v1/authorizations",
            json!({"idempotency_key": "k", "store_id": STORE, "order_id": "o-1",
                   "amount_cents": 5, "currency": "usd", "attempt": 1}),
        )
        .await;
    assert_eq!(currency.status, 422, "{currency:?}");
    assert!(currency.str("error").contains("ISO 4217"), "{currency:?}");
    assert_eq!(gw.ledger().await, vec![]);
    assert_eq!(gw.stats().await.authorizations.invalid, 4);
    assert_eq!(gw.authorize("k", "o-1", 5, 2).await.status, 201);
}

#[tokio::test]
async fn the_ledger_is_exact() {
    let clock = ManualClock::new(T0);
    let config = GatewayConfig {
        decline_rate: 0.5,
        seed: 11,
        ..GatewayConfig::default()
    };
    // Keys this config authorizes and one it declines, chosen by the documented rule.
    let pick = |declined: bool, skip: usize| {
        (0..)
            .map(|i| format!("key-{i}"))
            .filter(|k| config.decline_reason(k).is_some() == declined)
            .nth(skip)
            .unwrap()
    };
    let (k1, k2, k3) = (pick(false, 0), pick(true, 0), pick(false, 1));
    let reason = config.decline_reason(&k2).unwrap();
    let gw = start_with_clock(config.clone(), &clock).await;

    let a1 = gw
        .authorize(&k1, "o-1", 1000, 1)
        .await
        .str("authorization_id");
    gw.authorize(&k1, "o-1", 1000, 2).await;
    clock.advance(1_000);
    assert_eq!(gw.authorize(&k2, "o-2", 2000, 1).await.status, 402);
    gw.authorize(&k2, "o-2", 2000, 2).await;
    gw.authorize(&k2, "o-2", 2000, 3).await;
    clock.advance(1_000);
    let a3 = gw
        .authorize(&k3, "o-3", 3000, 2)
        .await
        .str("authorization_id");
    clock.advance(1_000);
    let r3 = gw
        .refund("o-3/refund", "o-3", &a3, 3000)
        .await
        .str("refund_id");

    let expected = vec![
        LedgerEntry {
            attempts_seen: 2,
            ..authorized_entry(&a1, &k1, "o-1", 1000)
        },
        LedgerEntry {
            authorization_id: None,
            idempotency_key: k2.clone(),
            store_id: STORE.into(),
            order_id: "o-2".into(),
            amount_cents: 2000,
            currency: "USD".into(),
            status: LedgerStatus::Declined,
            decline_reason: Some(reason.into()),
            first_attempt: 1,
            attempts_seen: 3,
            created_at: "1970-01-01T00:16:41.000Z".into(),
            refund: None,
        },
        LedgerEntry {
            status: LedgerStatus::Refunded,
            first_attempt: 2,
            created_at: "1970-01-01T00:16:42.000Z".into(),
            refund: Some(RefundEntry {
                refund_id: r3,
                idempotency_key: "o-3/refund".into(),
                amount_cents: 3000,
                attempts_seen: 1,
                created_at: "1970-01-01T00:16:43.000Z".into(),
            }),
            ..authorized_entry(&a3, &k3, "o-3", 3000)
        },
    ];
    assert_eq!(gw.ledger().await, expected);
    // The raw JSON has the documented field names, nulls included.
    let raw = gw.get("/v1/ledger").await.body;
    assert_eq!(raw[1]["status"], json!("declined"));
    assert_eq!(raw[1]["authorization_id"], Value::Null);
    assert_eq!(raw[2]["status"], json!("refunded"));
    assert_eq!(
        raw[2]["refund"]["refund_id"],
        json!(expected[2].refund.as_ref().unwrap().refund_id)
    );
    assert_eq!(
        gw.stats().await,
        Stats {
            authorizations: EndpointStats {
                succeeded: 2,
                declined: 1,
                replayed: 3,
                ..EndpointStats::default()
            },
            refunds: EndpointStats {
                succeeded: 1,
                ..EndpointStats::default()
            },
            voids: EndpointStats::default(),
        }
    );
}

#[tokio::test]
async fn an_invalid_config_does_not_start() {
    let config = GatewayConfig {
        decline_rate: 1.5,
        ..GatewayConfig::default()
    };
    let err = server::serve("127.0.0.1:0", config, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("decline_rate"), "{err}");
}

// ---------------------------------------------------------------- the client

#[tokio::test]
async fn the_client_authorizes_and_refunds_with_the_gateways_ids() {
    let gw = start(GatewayConfig::default()).await;
    let client = gw.client(2_000);
    let reference = succeeded(client.perform(authorize_effect("k", "o-1", 1200, 1)).await);
    let again = succeeded(client.perform(authorize_effect("k", "o-1", 1200, 2)).await);
    assert_eq!(
        again, reference,
        "a retry is answered with the same authorization"
    );
    let refund_id = succeeded(
        client
            .perform(refund_effect("r", "o-1", &reference, 1200))
            .await,
    );

    let ledger = gw.ledger().await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(
        ledger[0].authorization_id.as_deref(),
        Some(reference.as_str())
    );
    assert_eq!(ledger[0].attempts_seen, 2);
    assert_eq!(ledger[0].refund.as_ref().unwrap().refund_id, refund_id);
}

#[tokio::test]
async fn the_client_maps_refusals_to_rejected() {
    let gw = start(GatewayConfig {
        decline_rate: 1.0,
        ..GatewayConfig::default()
    })
    .await;
    let client = gw.client(2_000);
    // 402: the decline's own reason.
    let reason = rejected(client.perform(authorize_effect("k", "o-1", 100, 1)).await);
    assert_eq!(Some(reason), gw.ledger().await[0].decline_reason);
    // 409: the key was first used for another amount.
    let reason = rejected(client.perform(authorize_effect("k", "o-1", 999, 2)).await);
    assert!(
        reason.contains("409 Conflict") && reason.contains("first used"),
        "{reason}"
    );
    // 404: nothing to refund.
    let reason = rejected(
        client
            .perform(refund_effect("r", "o-1", "auth_nope", 100))
            .await,
    );
    assert!(
        reason.contains("404 Not Found") && reason.contains("auth_nope"),
        "{reason}"
    );
    // 422: an impossible request.
    let reason = rejected(client.perform(authorize_effect("k2", "o-2", -5, 1)).await);
    assert!(
        reason.contains("422") && reason.contains("amount_cents"),
        "{reason}"
    );
}

#[tokio::test]
async fn the_client_maps_an_outage_to_transient() {
    let gw = start(GatewayConfig::default()).await;
    gw.gateway.set_outage(true);
    let client = gw.client(2_000);
    let error = transient(client.perform(authorize_effect("k", "o-1", 100, 1)).await);
    assert!(
        error.contains("503 Service Unavailable") && error.contains("outage"),
        "{error}"
    );
    let error = transient(
        client
            .perform(refund_effect("r", "o-1", "auth_x", 100))
            .await,
    );
    assert!(error.contains("503") && error.contains("refund"), "{error}");
    gw.gateway.set_outage(false);
    succeeded(client.perform(authorize_effect("k", "o-1", 100, 2)).await);
}

#[tokio::test]
async fn a_timed_out_call_that_charged_is_answered_on_retry_not_charged_again() {
    let gw = start(GatewayConfig {
        latency_ms: 1_500,
        ..GatewayConfig::default()
    })
    .await;
    let client = gw.client(150);
    let started = Instant::now();
    let error = transient(client.perform(authorize_effect("k", "o-1", 100, 1)).await);
    assert!(
        started.elapsed() < Duration::from_millis(1_200),
        "the client gave up at its timeout, not the gateway's latency: {:?}",
        started.elapsed()
    );
    assert!(
        error.contains("did not answer the authorization within 150 ms"),
        "{error}"
    );
    // The bank was slow, not idle: the charge exists.
    let ledger = gw.ledger().await;
    assert_eq!(ledger.len(), 1);
    let charged = ledger[0].authorization_id.clone().unwrap();

    gw.gateway
        .set_config(GatewayConfig::default())
        .expect("valid config");
    let reference = succeeded(client.perform(authorize_effect("k", "o-1", 100, 2)).await);
    assert_eq!(reference, charged);
    let ledger = gw.ledger().await;
    assert_eq!((ledger.len(), ledger[0].attempts_seen), (1, 2));
}

#[tokio::test]
async fn the_client_reports_a_refused_connection() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = client_for(&format!("http://127.0.0.1:{port}/"), 2_000);
    let error = transient(client.perform(authorize_effect("k", "o-1", 100, 1)).await);
    assert!(
        error.contains("cannot connect to the gateway")
            && error.contains(&format!("127.0.0.1:{port}/v1/authorizations")),
        "{error}"
    );
}

/// A gateway that answers every call with the status and body a test scripts.
async fn scripted(status: u16, body: &'static str) -> (String, DropGuard) {
    use axum::http::StatusCode;
    let app = axum::Router::new().fallback(move || async move {
        (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            body,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    (format!("http://{addr}"), shutdown.drop_guard())
}

#[tokio::test]
async fn the_client_never_trusts_a_bad_answer() {
    let cases: [(u16, &str, &str, &str); 8] = [
        (201, "not json", "transient", "without authorization_id"),
        (
            200,
            r#"{"status":"authorized"}"#,
            "transient",
            "without authorization_id",
        ),
        (408, "", "transient", "408 Request Timeout"),
        (429, r#"{"error":"slow down"}"#, "transient", "slow down"),
        (
            500,
            "boom",
            "transient",
            "500 Internal Server Error to the authorization: boom",
        ),
        (502, "", "transient", "empty body"),
        (
            400,
            r#"{"error":"bad field"}"#,
            "rejected",
            "400 Bad Request): bad field",
        ),
        (402, "", "rejected", "402 Payment Required"),
    ];
    for (status, body, kind, needle) in cases {
        let (url, _stop) = scripted(status, body).await;
        let outcome = client_for(&url, 2_000)
            .perform(authorize_effect("k", "o-1", 100, 1))
            .await;
        let text = match (kind, outcome) {
            ("transient", EffectOutcome::Transient { error }) => error,
            ("rejected", EffectOutcome::Rejected { reason }) => reason,
            (_, other) => panic!("{status} {body:?}: expected {kind}, got {other:?}"),
        };
        assert!(text.contains(needle), "{status} {body:?}: {text}");
    }
}

#[tokio::test]
async fn a_void_cancels_a_charge_or_refuses_the_key_from_then_on() {
    let gw = start(GatewayConfig::default()).await;
    let void = |key: &'static str, order: &'static str| {
        gw.post(
            "/v1/voids",
            json!({"idempotency_key": key, "store_id": STORE, "order_id": order}),
        )
    };
    // A charge whose answer was lost: the void cancels it, and says so once more on replay.
    let id = gw
        .authorize("o-1/pay", "o-1", 1500, 5)
        .await
        .str("authorization_id");
    let first = void("o-1/pay", "o-1").await;
    assert_eq!(
        (first.status, first.str("status").as_str()),
        (200, "voided"),
        "{first:?}"
    );
    let again = void("o-1/pay", "o-1").await;
    assert_eq!(
        (again.status, again.str("status").as_str()),
        (200, "voided")
    );
    let refund = gw.refund("o-1/refund", "o-1", &id, 1500).await;
    assert_eq!(
        refund.status, 409,
        "a voided charge has nothing to refund: {refund:?}"
    );

    // Nothing charged yet: the key is refused from now on, so a late attempt cannot charge.
    let none = void("o-2/pay", "o-2").await;
    assert_eq!(
        (none.status, none.str("status").as_str()),
        (200, "not_charged")
    );
    let late = gw.authorize("o-2/pay", "o-2", 900, 6).await;
    assert_eq!(
        (late.status, late.str("reason").as_str()),
        (402, "voided"),
        "{late:?}"
    );

    // Another order's key is a conflict; a malformed void names the field.
    let conflict = void("o-1/pay", "o-9").await;
    assert_eq!(conflict.status, 409, "{conflict:?}");
    let bad = void("", "o-3").await;
    assert_eq!(bad.status, 422);
    assert!(bad.str("error").contains("idempotency_key"), "{bad:?}");

    let ledger = gw.ledger().await;
    let statuses: Vec<LedgerStatus> = ledger.iter().map(|e| e.status).collect();
    assert_eq!(statuses, vec![LedgerStatus::Voided, LedgerStatus::Voided]);
    assert_eq!(ledger[0].authorization_id.as_deref(), Some(id.as_str()));
    assert_eq!(ledger[1].authorization_id, None);
}

#[tokio::test]
async fn the_client_voids_through_the_gateway() {
    let gw = start(GatewayConfig::default()).await;
    let client = gw.client(2_000);
    succeeded(client.perform(authorize_effect("k", "o-1", 1200, 1)).await);
    let void = |key: &str, order: &str| orderflow::stages::Effect::Void {
        idempotency_key: key.into(),
        store_id: STORE.into(),
        order_id: order.into(),
        attempt: 1,
    };
    assert_eq!(succeeded(client.perform(void("k", "o-1")).await), "voided");
    assert_eq!(
        succeeded(client.perform(void("k2", "o-2")).await),
        "not_charged"
    );
}
