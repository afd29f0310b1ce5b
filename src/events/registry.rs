//! A client of a Confluent-compatible Schema Registry (its REST API): the writer schema
//! of a Confluent-framed record, by the ID in its frame, and registration of OrderFlow's
//! own schemas under the conventional subjects.
//!
//! Invariant: an ID is looked up over HTTP at most once per process while the registry
//! answers — a registry never changes what an ID means, so what it said (a schema, or
//! that the ID does not exist) is kept for good; only "could not ask" is not kept, and is
//! reported as transient so that the runtime retries instead of dead-lettering.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;

use super::EventType;
use crate::topics;

/// Media type of the registry's requests and answers.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// Nothing was learnt about the ID: retry later.
    #[error("schema registry at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    /// The registry answered with a server error: retry later.
    #[error("schema registry at {url} failed: HTTP {status}: {body}")]
    Server {
        url: String,
        status: u16,
        body: String,
    },
    /// The registry does not know the ID (HTTP 404): the record can never be read.
    #[error(
        "schema ID {id} is not in the schema registry at {url}: the record was framed with a schema ID this registry never issued"
    )]
    UnknownId { id: u32, url: String },
    /// The registry refused a request (HTTP 4xx other than an unknown ID).
    #[error("schema registry at {url} refused {what}: HTTP {status}: {body}")]
    Refused {
        url: String,
        what: String,
        status: u16,
        body: String,
    },
    /// The ID names something OrderFlow cannot read records with.
    #[error("schema ID {id} from the schema registry at {url} is unusable: {message}")]
    Unusable {
        id: u32,
        url: String,
        message: String,
    },
}

impl RegistryError {
    /// Whether asking again later may succeed (the registry was down or failing); any
    /// other error is the registry's final word.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. } | RegistryError::Server { .. }
        )
    }
}

/// A writer schema resolved from the registry.
#[derive(Debug)]
pub struct WriterSchema {
    /// Our event type whose record name the writer schema has, if any; otherwise the
    /// record's headers or topic say which type it is.
    pub event_type: Option<EventType>,
    pub schema: Schema,
}

/// What the registry said about an ID: kept for the life of the process.
pub type Lookup = Result<Arc<WriterSchema>, RegistryError>;

/// A registry's base URL and what it has said so far, shared by every codec of a process.
pub struct SchemaRegistry {
    url: String,
    client: reqwest::Client,
    cache: RwLock<HashMap<u32, Lookup>>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct SchemaById {
    schema: String,
    /// Absent means AVRO (the registry's default).
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Registered {
    id: u32,
}

impl SchemaRegistry {
    pub fn new(url: &str) -> Arc<SchemaRegistry> {
        Arc::new(SchemaRegistry {
            url: url.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .timeout(TIMEOUT)
                .connect_timeout(TIMEOUT)
                .build()
                .expect("an HTTP client without TLS builds"),
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// The process's one client of the registry at `url`: its workers share what it
    /// learnt.
    pub fn shared(url: &str) -> Arc<SchemaRegistry> {
        static SHARED: std::sync::LazyLock<std::sync::Mutex<HashMap<String, Arc<SchemaRegistry>>>> =
            std::sync::LazyLock::new(Default::default);
        let url = url.trim_end_matches('/');
        SHARED
            .lock()
            .expect("registry map lock")
            .entry(url.to_owned())
            .or_insert_with(|| SchemaRegistry::new(url))
            .clone()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// What is known of `id` without asking: the hot path of decoding.
    pub fn cached(&self, id: u32) -> Option<Lookup> {
        self.cache.read().expect("cache lock").get(&id).cloned()
    }

    /// The writer schema of `id`, asking the registry (blocking this thread) if it was
    /// never answered. Transient failures are returned and not kept.
    pub fn resolve_blocking(&self, id: u32) -> Lookup {
        if let Some(known) = self.cached(id) {
            return known;
        }
        // The registry's client is async; a thread of its own lets this be called from
        // anywhere, a worker's thread or inside an async task.
        let fetched = std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| RegistryError::Unreachable {
                        url: self.url.clone(),
                        message: format!("cannot start an HTTP runtime: {e}"),
                    })?
                    .block_on(self.fetch(id))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(RegistryError::Unreachable {
                    url: self.url.clone(),
                    message: "the lookup thread panicked".into(),
                })
            })
        });
        self.keep(id, fetched)
    }

    /// Asks the registry for `id` (async), keeping a final answer.
    pub async fn resolve(&self, id: u32) -> Lookup {
        if let Some(known) = self.cached(id) {
            return known;
        }
        let fetched = self.fetch(id).await;
        self.keep(id, fetched)
    }

    /// Makes sure every ID in `ids` has a final answer, asking for the missing ones; the
    /// first transient failure stops it (nothing learnt is lost).
    pub fn prefetch_blocking(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<(), RegistryError> {
        for id in ids {
            if let Err(e) = self.resolve_blocking(id)
                && e.is_transient()
            {
                return Err(e);
            }
        }
        Ok(())
    }

    fn keep(&self, id: u32, fetched: Result<WriterSchema, RegistryError>) -> Lookup {
        let lookup = fetched.map(Arc::new);
        if let Err(e) = &lookup
            && e.is_transient()
        {
            return lookup;
        }
        self.cache
            .write()
            .expect("cache lock")
            .entry(id)
            .or_insert(lookup)
            .clone()
    }

    async fn fetch(&self, id: u32) -> Result<WriterSchema, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.url);
        let body = self.get(&url, || RegistryError::UnknownId {
            id,
            url: self.url.clone(),
        });
        let found: SchemaById =
            serde_json::from_str(&body.await?).map_err(|e| RegistryError::Unusable {
                id,
                url: self.url.clone(),
                message: format!("unexpected answer: {e}"),
            })?;
        let unusable = |message: String| RegistryError::Unusable {
            id,
            url: self.url.clone(),
            message,
        };
        match found.schema_type.as_deref() {
            None | Some("AVRO") => {}
            Some(other) => return Err(unusable(format!("a {other} schema, not Avro"))),
        }
        if !found.references.is_empty() {
            return Err(unusable(
                "it references other schemas, which OrderFlow does not resolve".into(),
            ));
        }
        let schema = Schema::parse_str(&found.schema)
            .map_err(|e| unusable(format!("not a valid Avro schema: {e}")))?;
        let event_type = match &schema {
            Schema::Record(r) => event_type_named(r.name.name()),
            other => {
                let mut form = other.canonical_form();
                form.truncate(80);
                return Err(unusable(format!(
                    "{form} is not a record schema; OrderFlow's events are records"
                )));
            }
        };
        Ok(WriterSchema { event_type, schema })
    }

    /// GETs `url`'s body; a 404 is `not_found()`.
    async fn get(
        &self,
        url: &str,
        not_found: impl FnOnce() -> RegistryError,
    ) -> Result<String, RegistryError> {
        let resp = self
            .client
            .get(url)
            .header("Accept", CONTENT_TYPE)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| self.unreachable(e))?;
        if status.is_success() {
            Ok(body)
        } else if status == reqwest::StatusCode::NOT_FOUND {
            Err(not_found())
        } else if status.is_server_error() {
            Err(RegistryError::Server {
                url: self.url.clone(),
                status: status.as_u16(),
                body,
            })
        } else {
            Err(RegistryError::Refused {
                url: self.url.clone(),
                what: url.to_owned(),
                status: status.as_u16(),
                body,
            })
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> RegistryError {
        RegistryError::Unreachable {
            url: self.url.clone(),
            message: e.to_string(),
        }
    }

    /// Registers `schema` under `subject` (`POST /subjects/{subject}/versions`); the
    /// registry answers with the schema's global ID, the same one again for a schema it
    /// already has, so registering twice changes nothing.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{subject}/versions", self.url);
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" });
        let resp = self
            .client
            .post(&url)
            .header("Content-Type", CONTENT_TYPE)
            .header("Accept", CONTENT_TYPE)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        if status.is_server_error() {
            return Err(RegistryError::Server {
                url: self.url.clone(),
                status: status.as_u16(),
                body: text,
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Refused {
                url: self.url.clone(),
                what: format!("registering subject {subject}"),
                status: status.as_u16(),
                body: text,
            });
        }
        let r: Registered = serde_json::from_str(&text).map_err(|e| RegistryError::Refused {
            url: self.url.clone(),
            what: format!("registering subject {subject}"),
            status: status.as_u16(),
            body: format!("unexpected answer {text:?}: {e}"),
        })?;
        Ok(r.id)
    }
}

/// Our event type whose Avro record is called `name` (unqualified: a producer may keep
/// our records in its own namespace).
fn event_type_named(name: &str) -> Option<EventType> {
    EventType::ALL.iter().copied().find(|t| t.name() == name)
}

/// The registry subjects OrderFlow's schemas go under, with the event type of each.
///
/// A topic that carries one event type uses Confluent's default `TopicNameStrategy`:
/// `<topic>-value`. A topic that carries several uses `TopicRecordNameStrategy`:
/// `<topic>-<fully qualified record name>`, one subject per event type — what a
/// Confluent serializer configured with
/// `value.subject.name.strategy=io.confluent.kafka.serializers.subject.TopicRecordNameStrategy`
/// looks up. (A union under `<topic>-value` would oblige every producer to write the
/// union, which OrderFlow's records, one type each, are not.)
pub fn subjects(topics: &crate::topics::Topics) -> Vec<(String, EventType)> {
    let mut by_topic: std::collections::BTreeMap<&'static str, Vec<EventType>> = Default::default();
    for &t in EventType::ALL {
        by_topic.entry(topics::topic_of(t)).or_default().push(t);
    }
    let mut out = Vec::new();
    for (base, types) in by_topic {
        let topic = topics.name(base);
        if let [only] = types.as_slice() {
            out.push((format!("{topic}-value"), *only));
        } else {
            for t in types {
                out.push((format!("{topic}-{}", full_name(t)), t));
            }
        }
    }
    out
}

/// The fully qualified Avro name of `t`'s record (`io.orderflow.events.OrderCreated`).
pub fn full_name(t: EventType) -> String {
    Schema::parse_str(t.schema_source())
        .ok()
        .and_then(|s| s.name().map(|n| n.fullname(None)))
        .unwrap_or_else(|| t.name().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_type_topics_use_the_value_subject_and_others_the_record_name() {
        let subjects = subjects(&crate::topics::Topics::new("p."));
        let find = |t: EventType| {
            subjects
                .iter()
                .find(|(_, e)| *e == t)
                .map(|(s, _)| s.as_str())
        };
        assert_eq!(find(EventType::OrderCreated), Some("p.order.created-value"));
        assert_eq!(
            find(EventType::StockRestocked),
            Some("p.inventory.commands-io.orderflow.events.StockRestocked")
        );
        assert_eq!(subjects.len(), EventType::ALL.len(), "one subject per type");
        let distinct: std::collections::HashSet<_> = subjects.iter().map(|(s, _)| s).collect();
        assert_eq!(distinct.len(), subjects.len());
    }

    #[test]
    fn an_unreachable_registry_is_transient_and_not_kept() {
        // Port 9 (discard) on loopback: nothing listens there.
        let r = SchemaRegistry::new("http://127.0.0.1:9/");
        let e = r.resolve_blocking(7).expect_err("nothing listens");
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("unreachable"), "{e}");
        assert!(r.cached(7).is_none());
        assert!(r.prefetch_blocking([7]).is_err());
    }
}
