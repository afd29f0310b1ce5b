//! A schema registry of the test suite's own, speaking the part of Confluent Schema
//! Registry's REST API that OrderFlow and Confluent serializers use:
//!
//! - `POST /subjects/{subject}/versions` `{"schema": "…"}` → `{"id": N}`: a schema the
//!   registry already holds (same text, any subject) keeps its global ID, and a subject
//!   gets a new version only for a schema new to it — so registering is idempotent;
//! - `GET /schemas/ids/{id}` → `{"schema": "…"}`, or 404 with error code 40403;
//! - `GET /subjects` and `GET /subjects/{subject}/versions`.
//!
//! It runs on a thread of its own, on a fixed loopback port: [`TestRegistry::stop`] closes
//! the port (clients see connection refused, as with a registry that is down) and
//! [`TestRegistry::start`] opens it again with everything it held. It counts the lookups
//! of each ID, so a test can show that clients cache.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

#[derive(Default)]
struct Store {
    /// Schema text by global ID (IDs start at 1).
    schemas: Vec<String>,
    /// Schema IDs per subject, in version order.
    subjects: BTreeMap<String, Vec<u32>>,
    /// `GET /schemas/ids/{id}` requests per ID.
    lookups: BTreeMap<u32, u32>,
}

type Shared = Arc<Mutex<Store>>;

pub struct TestRegistry {
    pub addr: SocketAddr,
    store: Shared,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl TestRegistry {
    /// A registry listening on a free loopback port.
    pub fn start_new() -> TestRegistry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut r = TestRegistry {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            store: Shared::default(),
            running: None,
        };
        r.start();
        r
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Opens the port again (or for the first time); what was registered is kept.
    pub fn start(&mut self) {
        assert!(self.running.is_none(), "the test registry already runs");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let store = self.store.clone();
        let addr = self.addr;
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
                socket.set_reuseaddr(true).expect("SO_REUSEADDR");
                socket.bind(addr).expect("binding the registry's port");
                let listener = socket.listen(64).expect("listening");
                ready_tx.send(()).expect("the test waits");
                let app = axum::Router::new()
                    .route("/subjects", get(list_subjects))
                    .route("/subjects/{subject}/versions", post(register).get(versions))
                    .route("/schemas/ids/{id}", get(by_id))
                    .with_state(store);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("the test registry serves");
            });
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the test registry starts");
        self.running = Some((stop_tx, thread));
    }

    /// Closes the port: clients get connection refused until [`start`](Self::start).
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            thread.join().expect("the test registry's thread");
        }
    }

    /// Registers `schema` under `subject` directly (as another producer would have).
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        register_in(&mut self.store.lock().unwrap(), subject, schema)
    }

    /// How many times `GET /schemas/ids/{id}` was asked.
    pub fn lookups(&self, id: u32) -> u32 {
        self.store
            .lock()
            .unwrap()
            .lookups
            .get(&id)
            .copied()
            .unwrap_or(0)
    }

    /// Every subject with its versions' schema IDs.
    pub fn subjects(&self) -> BTreeMap<String, Vec<u32>> {
        self.store.lock().unwrap().subjects.clone()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn register_in(store: &mut Store, subject: &str, schema: &str) -> u32 {
    // Confluent compares schemas by content; whitespace is not content.
    let normalized = serde_json::from_str::<serde_json::Value>(schema)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| schema.to_owned());
    let id = match store.schemas.iter().position(|s| *s == normalized) {
        Some(i) => i as u32 + 1,
        None => {
            store.schemas.push(normalized);
            store.schemas.len() as u32
        }
    };
    let versions = store.subjects.entry(subject.to_owned()).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    id
}

fn error(status: StatusCode, code: u32, message: String) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": message})),
    )
        .into_response()
}

async fn register(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    body: String,
) -> Response {
    let Ok(body) = serde_json::from_str::<serde_json::Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, 400, "body is not JSON".into());
    };
    let Some(schema) = body.get("schema").and_then(|s| s.as_str()) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "no `schema` string".into(),
        );
    };
    if let Some(t) = body.get("schemaType").and_then(|s| s.as_str())
        && t != "AVRO"
    {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("schema type {t} not supported here"),
        );
    }
    if apache_avro::Schema::parse_str(schema).is_err() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "invalid Avro schema".into(),
        );
    }
    let id = register_in(&mut store.lock().unwrap(), &subject, schema);
    Json(json!({ "id": id })).into_response()
}

async fn by_id(State(store): State<Shared>, Path(id): Path<u32>) -> Response {
    let mut store = store.lock().unwrap();
    *store.lookups.entry(id).or_default() += 1;
    match id
        .checked_sub(1)
        .and_then(|i| store.schemas.get(i as usize))
    {
        Some(schema) => Json(json!({ "schema": schema })).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema {id} not found"),
        ),
    }
}

async fn list_subjects(State(store): State<Shared>) -> Response {
    let store = store.lock().unwrap();
    Json(store.subjects.keys().collect::<Vec<_>>()).into_response()
}

async fn versions(State(store): State<Shared>, Path(subject): Path<String>) -> Response {
    let store = store.lock().unwrap();
    match store.subjects.get(&subject) {
        Some(ids) => Json((1..=ids.len()).collect::<Vec<_>>()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        ),
    }
}
