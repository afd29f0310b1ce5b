//! Settings: one struct, resolved in this order — embedded defaults, then a TOML file
//! (`--config` / `ORDERFLOW_CONFIG`), then `ORDERFLOW_*` environment variables — so the
//! environment always wins, as operators expect of containers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topics::Topics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Kafka transactions: outputs, state and input offsets commit atomically.
    ExactlyOnce,
    /// Outputs, then state, then offsets; deterministic IDs and dedup make effects once.
    AtLeastOnce,
}

impl std::str::FromStr for Guarantee {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exactly_once" => Ok(Guarantee::ExactlyOnce),
            "at_least_once" => Ok(Guarantee::AtLeastOnce),
            other => Err(format!(
                "unknown guarantee {other:?}: expected exactly_once or at_least_once"
            )),
        }
    }
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Guarantee::ExactlyOnce => "exactly_once",
            Guarantee::AtLeastOnce => "at_least_once",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Prepended to every topic name.
    pub topic_prefix: String,
    /// `exactly_once` (Kafka transactions; needs a broker that has them) or
    /// `at_least_once` (any Kafka-protocol broker; effects still once).
    pub guarantee: Guarantee,
    /// Consumer group ID prefix; each stage's group is `<group_prefix>.<stage>`.
    pub group_prefix: String,
    /// Identifies this worker; the transactional ID is derived from it, so a restarted
    /// worker with the same ID fences its previous incarnation.
    pub instance_id: String,
    /// Partition count for `topics create`.
    pub partitions: i32,
    /// Replication factor for `topics create`.
    pub replication_factor: i32,
    /// A batch holds at most this many input records. A batch closes as soon as the
    /// consumer has no more records at hand, so it is as large as what arrived while the
    /// previous one committed: a few records at a low rate (committed at once), up to
    /// this many under a backlog.
    pub batch_max_records: usize,
    /// A batch closes at the latest this long after it started, even while records keep
    /// arriving; an idle worker goes round its loop (timers, rebalances) this often.
    pub batch_interval_ms: u64,
    /// A batch stays open at least this long after its first record (up to
    /// `batch_interval_ms`), gathering what arrives meanwhile. 0: it closes as soon as the
    /// consumer has nothing more at hand, for the lowest latency. Raise it where every
    /// commit is expensive (a broker slow to serve small requests; under `exactly_once`,
    /// a transaction per batch): fewer, larger batches, each output later by up to this.
    pub batch_linger_ms: u64,
    /// Input event IDs remembered per partition to drop the same event arriving again at
    /// another offset (an upstream re-send after a crash, a producer retry). Replays of
    /// the same offsets are recognized by position, without this window.
    pub dedup_window_records: usize,
    /// Largest record a stage produces (key, value and headers), below the broker's and
    /// the producer's `message.max.bytes`: a larger output dead-letters its input, and a
    /// dead letter is truncated to fit.
    pub max_record_bytes: usize,
    /// Directory of the workers' local state files (one per owned partition, deleted
    /// when the partition goes; a copy of the changelog, never a source of truth).
    /// Empty: `orderflow-state` in the system's temporary directory.
    pub state_dir: String,
    /// State entries per store a partition caches in memory before the cache turns over:
    /// committed values are then written back to its state file and the cache becomes the
    /// previous generation (so memory holds up to about twice this); the rest is read from
    /// the file when an input needs it.
    pub state_cache_entries: usize,
    /// Address of the metrics and health endpoint; port 0 picks a free port.
    pub http_addr: String,
    /// Address `orderflow api` listens on (the HTTP API, with its own `/metrics`);
    /// port 0 picks a free port.
    pub api_addr: String,
    /// librdkafka properties passed through to every client (after OrderFlow's own):
    /// `[kafka]` in the file.
    pub kafka: BTreeMap<String, String>,
    /// Where the SQL sinks write: `postgres://…` in production, `sqlite://…` embedded.
    pub database_url: String,
    /// Base URL of a Confluent-compatible schema registry (`http://host:8081`): a
    /// Confluent-framed record is read with the writer schema its ID names there. Empty:
    /// no registry; such a record is read with OrderFlow's own schema whatever its ID.
    pub schema_registry_url: String,
    pub fraud: FraudSettings,
    pub inventory: InventorySettings,
    pub payment: PaymentSettings,
    pub fulfillment: FulfillmentSettings,
    pub alerts: AlertSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertSettings {
    /// Publish a `ReplenishmentRequested` when a low-stock alert opens.
    pub replenishment_enabled: bool,
    /// Units a `ReplenishmentRequested` asks for.
    pub replenishment_quantity: i32,
    /// `PaymentRetrying` events of one store within one clock minute that open a
    /// `gateway_outage` alert.
    pub gateway_outage_retries_per_minute: i64,
    /// Per-store overrides of `replenishment_enabled` and `replenishment_quantity`, keyed
    /// by store ID: `[alerts.stores."store-7"]`.
    pub stores: BTreeMap<String, StoreAlertSettings>,
}

/// A store's own replenishment settings; what is unset falls back to [`AlertSettings`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreAlertSettings {
    pub replenishment_enabled: Option<bool>,
    pub replenishment_quantity: Option<i32>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            replenishment_enabled: true,
            replenishment_quantity: 100,
            gateway_outage_retries_per_minute: 20,
            stores: BTreeMap::new(),
        }
    }
}

impl AlertSettings {
    /// The quantity to request when a low-stock alert of `store_id` opens; `None` when the
    /// store does not replenish automatically.
    pub fn replenishment_quantity(&self, store_id: &str) -> Option<i32> {
        let store = self.stores.get(store_id);
        let enabled = store
            .and_then(|s| s.replenishment_enabled)
            .unwrap_or(self.replenishment_enabled);
        let quantity = store
            .and_then(|s| s.replenishment_quantity)
            .unwrap_or(self.replenishment_quantity);
        (enabled && quantity > 0).then_some(quantity)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InventorySettings {
    /// How often the low-stock watchdog re-checks every SKU of a partition (0: never).
    pub watchdog_interval_secs: u64,
    /// Threshold of SKUs that never had one set.
    pub default_low_stock_threshold: i32,
}

impl Default for InventorySettings {
    fn default() -> Self {
        InventorySettings {
            watchdog_interval_secs: 300,
            default_low_stock_threshold: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaymentSettings {
    /// Base URL of the payment gateway (`orderflow gateway` serves the same API).
    pub gateway_url: String,
    /// A gateway call slower than this is a transient failure.
    pub timeout_ms: u64,
    /// Gateway calls in flight at once per worker; calls of one batch run concurrently.
    pub concurrency: usize,
    /// Retry n (1-based) waits min(cap, base * factor^(n-1)), jittered down by up to half:
    /// the base.
    pub retry_base_ms: u64,
    /// The factor by which each retry's wait grows.
    pub retry_factor: f64,
    /// The longest wait between two attempts.
    pub retry_cap_ms: u64,
    /// Attempts in all, the first included; then PaymentFailed (gateway unavailable).
    pub max_attempts: u32,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        PaymentSettings {
            gateway_url: "http://127.0.0.1:8081".into(),
            timeout_ms: 2_000,
            concurrency: 32,
            retry_base_ms: 500,
            retry_factor: 2.0,
            retry_cap_ms: 30_000,
            max_attempts: 6,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FulfillmentSettings {
    /// From Picking to Packed.
    pub pick_ms: u64,
    /// From Packed to ReadyToShip.
    pub pack_ms: u64,
}

impl Default for FulfillmentSettings {
    fn default() -> Self {
        FulfillmentSettings {
            pick_ms: 1_000,
            pack_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FraudSettings {
    /// Orders above this total (minor units) are rejected.
    pub max_order_total_cents: i64,
    /// Customer IDs whose orders are rejected.
    pub blocked_customers: Vec<String>,
    /// E-mail addresses whose orders are rejected, matched case-insensitively.
    pub blocked_emails: Vec<String>,
    /// More than this many orders of one customer within the window are rejected.
    pub velocity_max_orders: u32,
    /// The velocity window.
    pub velocity_window_secs: u64,
}

impl Default for FraudSettings {
    fn default() -> Self {
        FraudSettings {
            max_order_total_cents: 1_000_000,
            blocked_customers: Vec::new(),
            blocked_emails: Vec::new(),
            velocity_max_orders: 5,
            velocity_window_secs: 3600,
        }
    }
}

impl Settings {
    /// Where local state files go.
    pub fn state_dir(&self) -> std::path::PathBuf {
        if self.state_dir.is_empty() {
            std::env::temp_dir().join("orderflow-state")
        } else {
            std::path::PathBuf::from(&self.state_dir)
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            guarantee: Guarantee::ExactlyOnce,
            group_prefix: "orderflow".into(),
            instance_id: default_instance_id(),
            partitions: 6,
            replication_factor: 1,
            batch_max_records: 500,
            batch_interval_ms: 100,
            batch_linger_ms: 0,
            dedup_window_records: 100_000,
            max_record_bytes: 900_000,
            state_dir: String::new(),
            state_cache_entries: 10_000,
            http_addr: "127.0.0.1:9464".into(),
            api_addr: "127.0.0.1:8080".into(),
            kafka: BTreeMap::new(),
            database_url: DEFAULT_DATABASE_URL.into(),
            schema_registry_url: String::new(),
            fraud: FraudSettings::default(),
            inventory: InventorySettings::default(),
            payment: PaymentSettings::default(),
            fulfillment: FulfillmentSettings::default(),
            alerts: AlertSettings::default(),
        }
    }
}

/// The embedded default: an SQLite file in the working directory, created when missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://orderflow.db";

fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    format!(
        "{}-{}",
        if host.is_empty() { "worker" } else { host },
        std::process::id()
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid settings file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid value of {var}: {message}")]
    Env { var: String, message: String },
    #[error("inconsistent settings: {0}")]
    Inconsistent(String),
}

impl Settings {
    /// Defaults, then the file (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut s = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.display().to_string(),
                    source: Box::new(e),
                })?
            }
            None => Settings::default(),
        };
        s.apply_env(|k| std::env::var(k).ok())?;
        s.check()?;
        Ok(s)
    }

    /// Settings that cannot work together. Under `at_least_once` a batch's outputs are
    /// written into the changelog first, in chunks of up to the outbox's chunk size (or
    /// one output, up to `max_record_bytes`): a producer that refuses records that large
    /// could write no batch at all.
    pub fn check(&self) -> Result<(), ConfigError> {
        let Some(v) = self.kafka.get("message.max.bytes") else {
            return Ok(());
        };
        let max: usize = v.trim().parse().map_err(|_| {
            ConfigError::Inconsistent(format!("kafka message.max.bytes {v:?} is not a number"))
        })?;
        let needed = self
            .max_record_bytes
            .max(crate::runtime::outbox::CHUNK_BYTES)
            + 4096;
        if self.guarantee == Guarantee::AtLeastOnce && max < needed {
            return Err(ConfigError::Inconsistent(format!(
                "kafka message.max.bytes ({max}) is below {needed}, the largest changelog record under at_least_once (max_record_bytes {} or the outbox's {}-byte chunks, plus headers); raise it or lower max_record_bytes",
                self.max_record_bytes,
                crate::runtime::outbox::CHUNK_BYTES
            )));
        }
        Ok(())
    }

    /// Applies `ORDERFLOW_*` variables; `get` is injected so tests need not touch the
    /// process environment.
    ///
    /// Every key has a variable derived from its path (see [`env_keys`]): `ORDERFLOW_`
    /// and the path's parts joined by `_`, upper-cased — `payment.retry_factor` is
    /// `ORDERFLOW_PAYMENT_RETRY_FACTOR`. Nothing is listed by hand: the keys are walked
    /// from the settings' own serialized form, so a new key has its variable at once.
    /// A list takes comma-separated items (or a JSON array); a table (`kafka`,
    /// `alerts.stores`) takes `key=value` pairs separated by commas, or a JSON object,
    /// merged into what the file set.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let mut value = serde_json::to_value(&*self).expect("settings serialize to JSON");
        let mut changed = false;
        for key in env_keys() {
            let found = get(&key.var).map(|v| (key.var.clone(), v)).or_else(|| {
                let alias = key.alias?;
                get(alias).map(|v| (alias.to_owned(), v))
            });
            let Some((var, v)) = found else { continue };
            let env_err = |message: String| ConfigError::Env {
                var: var.clone(),
                message,
            };
            let slot = key
                .path
                .iter()
                .try_fold(&mut value, |v, part| v.get_mut(part.as_str()))
                .expect("every key is in the settings");
            *slot = env_value(slot, &v).map_err(env_err)?;
            // Checked one variable at a time, so that an error names the variable.
            Settings::deserialize(&value).map_err(|e| env_err(e.to_string()))?;
            changed = true;
        }
        if changed {
            *self = Settings::deserialize(value).map_err(|e| ConfigError::Env {
                var: "ORDERFLOW_*".into(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    pub fn topics(&self) -> Topics {
        Topics::new(self.topic_prefix.clone())
    }

    pub fn batch_interval(&self) -> Duration {
        Duration::from_millis(self.batch_interval_ms)
    }

    pub fn group_id(&self, stage: &str) -> String {
        format!("{}.{stage}", self.group_prefix)
    }

    /// Base librdkafka configuration with the pass-through map applied last.
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        self.kafka_client::<&str, &str>([])
    }

    /// The configuration of every Kafka client OrderFlow builds: `bootstrap.servers`,
    /// then the client's own `properties`, then the `kafka` pass-through map — last, so
    /// that an operator's property always wins.
    pub fn kafka_client<K: Into<String>, V: Into<String>>(
        &self,
        properties: impl IntoIterator<Item = (K, V)>,
    ) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in properties {
            c.set(k, v);
        }
        for (k, v) in &self.kafka {
            c.set(k, v);
        }
        c
    }

    /// The schema registry of this process (shared by all its workers, so an ID is
    /// looked up once), if `schema_registry_url` is set.
    pub fn schema_registry(
        &self,
    ) -> Option<std::sync::Arc<crate::events::registry::SchemaRegistry>> {
        let url = self.schema_registry_url.trim();
        (!url.is_empty()).then(|| crate::events::registry::SchemaRegistry::shared(url))
    }
}

/// A settings key and the environment variable that sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvKey {
    /// The key's path: `["payment", "retry_factor"]`.
    pub path: Vec<String>,
    /// `ORDERFLOW_PAYMENT_RETRY_FACTOR`.
    pub var: String,
    /// An older name still read when `var` is unset.
    pub alias: Option<&'static str>,
}

impl EnvKey {
    /// The dotted key, as in the settings file: `payment.retry_factor`.
    pub fn key(&self) -> String {
        self.path.join(".")
    }
}

/// Names variables had before they were derived from the key's path; still read.
const ENV_ALIASES: &[(&str, &str)] = &[("payment.gateway_url", "ORDERFLOW_GATEWAY_URL")];

/// Every settings key, sorted by path, walked from the defaults' serialized form. A table is a key of its own (not walked into) when its default is
/// empty: its keys are the operator's (`kafka`'s librdkafka properties, store IDs).
pub fn env_keys() -> Vec<EnvKey> {
    fn walk(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<EnvKey>) {
        match v {
            serde_json::Value::Object(fields) if !fields.is_empty() => {
                for (name, field) in fields {
                    path.push(name.clone());
                    walk(field, path, out);
                    path.pop();
                }
            }
            _ => {
                let key = path.join(".");
                out.push(EnvKey {
                    var: format!("ORDERFLOW_{}", path.join("_").to_uppercase()),
                    alias: ENV_ALIASES
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, alias)| *alias),
                    path: path.clone(),
                });
            }
        }
    }
    let defaults = serde_json::to_value(Settings::default()).expect("settings serialize to JSON");
    let mut out = Vec::new();
    walk(&defaults, &mut Vec::new(), &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The JSON value a variable sets a key to, shaped like the key's `current` value; the
/// settings' own deserialization then checks it.
fn env_value(current: &serde_json::Value, v: &str) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    let t = v.trim();
    Ok(match current {
        J::String(_) => J::String(v.to_owned()),
        J::Bool(_) => J::Bool(match t {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(format!("{v:?} is not a boolean (true or false)")),
        }),
        J::Number(_) => {
            J::Number(serde_json::from_str(t).map_err(|_| format!("{v:?} is not a number"))?)
        }
        J::Array(_) if t.starts_with('[') => {
            serde_json::from_str(t).map_err(|e| format!("not a JSON array: {e}"))?
        }
        J::Array(_) => J::Array(
            t.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| J::String(s.to_owned()))
                .collect(),
        ),
        J::Object(existing) => {
            let mut merged = existing.clone();
            if t.starts_with('{') {
                let J::Object(given) =
                    serde_json::from_str(t).map_err(|e| format!("not a JSON object: {e}"))?
                else {
                    unreachable!("a JSON text starting with {{ is an object");
                };
                merged.extend(given);
            } else {
                // `key=value` pairs separated by commas, e.g. `socket.timeout.ms=5000,debug=broker`.
                for pair in t.split(',').filter(|p| !p.trim().is_empty()) {
                    let (k, val) = pair
                        .split_once('=')
                        .ok_or_else(|| format!("{pair:?} is not key=value"))?;
                    merged.insert(k.trim().into(), J::String(val.trim().into()));
                }
            }
            J::Object(merged)
        }
        J::Null => serde_json::from_str(t).unwrap_or_else(|_| J::String(v.to_owned())),
    })
}

/// Keys whose default depends on the machine, with how the table describes it.
const MACHINE_DEFAULTS: &[(&str, &str)] = &[("instance_id", "hostname-pid")];

/// The README's settings table, generated: every key of [`env_keys`] with its
/// variable, its default and the doc comment of its field in this file (so that a key
/// cannot go undocumented: the README's table test fails).
pub fn settings_table() -> String {
    let docs = field_docs();
    let defaults = serde_json::to_value(Settings::default()).expect("settings serialize to JSON");
    let mut out = String::from("| key | environment | default | meaning |\n|---|---|---|---|\n");
    for key in env_keys() {
        let name = key.key();
        let default = match MACHINE_DEFAULTS.iter().find(|(k, _)| *k == name) {
            Some((_, d)) => (*d).to_owned(),
            None => {
                let v = key
                    .path
                    .iter()
                    .try_fold(&defaults, |v, part| v.get(part.as_str()))
                    .expect("every key is in the defaults");
                match v {
                    serde_json::Value::String(s) if s.is_empty() => "empty".to_owned(),
                    serde_json::Value::String(s) => format!("`{s}`"),
                    serde_json::Value::Array(a) if a.is_empty() => "empty list".to_owned(),
                    serde_json::Value::Object(o) if o.is_empty() => "empty table".to_owned(),
                    other => format!("`{other}`"),
                }
            }
        };
        let env = match key.alias {
            Some(alias) => format!("`{}` (or `{alias}`)", key.var),
            None => format!("`{}`", key.var),
        };
        let doc = docs.get(&name).map(String::as_str).unwrap_or("");
        out.push_str(&format!(
            "| `{name}` | {env} | {default} | {} |\n",
            doc.replace('|', "\\|")
        ));
    }
    out
}

/// The doc comment of every settings key's field, by dotted key, read from this file's
/// source: the struct fields, followed from `Settings` into its sections.
fn field_docs() -> std::collections::HashMap<String, String> {
    // struct name -> [(field, type, doc)]
    let mut structs: std::collections::HashMap<&str, Vec<(&str, &str, String)>> =
        Default::default();
    let mut current: Option<&str> = None;
    let mut doc: Vec<&str> = Vec::new();
    for line in include_str!("config.rs").lines() {
        let t = line.trim();
        if let Some(name) = t
            .strip_prefix("pub struct ")
            .and_then(|r| r.strip_suffix(" {"))
        {
            current = Some(name);
            doc.clear();
        } else if t == "}" {
            current = None;
        } else if let Some(d) = t.strip_prefix("///") {
            doc.push(d.trim());
        } else if let (Some(s), Some(field)) = (current, t.strip_prefix("pub "))
            && let Some((name, ty)) = field.split_once(": ")
        {
            structs
                .entry(s)
                .or_default()
                .push((name, ty.trim_end_matches(','), doc.join(" ")));
            doc.clear();
        } else {
            doc.clear();
        }
    }
    fn walk(
        structs: &std::collections::HashMap<&str, Vec<(&str, &str, String)>>,
        name: &str,
        prefix: &str,
        out: &mut std::collections::HashMap<String, String>,
    ) {
        for (field, ty, doc) in structs.get(name).into_iter().flatten() {
            let key = format!("{prefix}{field}");
            if structs.contains_key(ty) {
                walk(structs, ty, &format!("{key}."), out);
            } else {
                out.insert(key, doc.clone());
            }
        }
    }
    let mut out = Default::default();
    walk(&structs, "Settings", "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file_and_defaults() -> Result<(), Box<dyn std::error::Error>> {
        let mut s: Settings = toml::from_str("brokers = \"file:1\"\ntopic_prefix = \"f.\"\n")?;
        assert_eq!(s.guarantee, Guarantee::ExactlyOnce);
        let env = |k: &str| match k {
            "ORDERFLOW_BROKERS" => Some("env:2".to_string()),
            "ORDERFLOW_GUARANTEE" => Some("at_least_once".to_string()),
            "ORDERFLOW_KAFKA" => Some("socket.timeout.ms=5000, debug=broker".to_string()),
            _ => None,
        };
        s.apply_env(env)?;
        assert_eq!(s.brokers, "env:2");
        assert_eq!(s.topic_prefix, "f.");
        assert_eq!(s.guarantee, Guarantee::AtLeastOnce);
        assert_eq!(s.kafka.get("debug").map(String::as_str), Some("broker"));
        assert_eq!(s.kafka.len(), 2);
        Ok(())
    }

    #[test]
    fn replenishment_is_configured_per_store() -> Result<(), Box<dyn std::error::Error>> {
        let mut s: Settings = toml::from_str(
            "[alerts]\nreplenishment_quantity = 40\n\
             [alerts.stores.s-off]\nreplenishment_enabled = false\n\
             [alerts.stores.s-big]\nreplenishment_quantity = 500\n",
        )?;
        assert_eq!(s.alerts.replenishment_quantity("s-any"), Some(40));
        assert_eq!(s.alerts.replenishment_quantity("s-off"), None);
        assert_eq!(s.alerts.replenishment_quantity("s-big"), Some(500));
        s.apply_env(|k| (k == "ORDERFLOW_ALERTS_REPLENISHMENT_ENABLED").then(|| "false".into()))?;
        assert_eq!(s.alerts.replenishment_quantity("s-any"), None);
        assert_eq!(s.alerts.replenishment_quantity("s-big"), None);
        Ok(())
    }

    #[test]
    fn bad_guarantee_names_the_variable() {
        let mut s = Settings::default();
        let err = s
            .apply_env(|k| (k == "ORDERFLOW_GUARANTEE").then(|| "twice".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("ORDERFLOW_GUARANTEE"), "{err}");
    }
}

#[cfg(test)]
mod env_keys {
    use super::*;

    fn var(path: &str) -> String {
        env_keys()
            .into_iter()
            .find(|k| k.key() == path)
            .map(|k| k.var)
            .unwrap_or_else(|| panic!("no key {path}"))
    }

    #[test]
    fn variables_are_derived_from_the_key_path() {
        assert_eq!(
            var("payment.retry_factor"),
            "ORDERFLOW_PAYMENT_RETRY_FACTOR"
        );
        assert_eq!(
            var("dedup_window_records"),
            "ORDERFLOW_DEDUP_WINDOW_RECORDS"
        );
        assert_eq!(var("payment.concurrency"), "ORDERFLOW_PAYMENT_CONCURRENCY");
        assert_eq!(
            var("inventory.default_low_stock_threshold"),
            "ORDERFLOW_INVENTORY_DEFAULT_LOW_STOCK_THRESHOLD"
        );
        assert_eq!(
            var("fraud.max_order_total_cents"),
            "ORDERFLOW_FRAUD_MAX_ORDER_TOTAL_CENTS"
        );
        assert_eq!(var("schema_registry_url"), "ORDERFLOW_SCHEMA_REGISTRY_URL");
        assert_eq!(var("kafka"), "ORDERFLOW_KAFKA");
        assert_eq!(var("alerts.stores"), "ORDERFLOW_ALERTS_STORES");
        let keys = env_keys();
        let vars: std::collections::HashSet<_> = keys.iter().map(|k| &k.var).collect();
        assert_eq!(vars.len(), keys.len(), "two keys share a variable");
    }

    /// A value unlike the default, in the variable's syntax, for any key.
    fn other_value(default: &serde_json::Value, key: &str) -> String {
        use serde_json::Value as J;
        match default {
            J::String(s) if key == "guarantee" => {
                if s == "exactly_once" {
                    "at_least_once".into()
                } else {
                    "exactly_once".into()
                }
            }
            J::String(s) => format!("{s}-changed"),
            J::Bool(b) => (!b).to_string(),
            J::Number(n) if n.is_f64() => (n.as_f64().unwrap_or(0.0) + 0.5).to_string(),
            J::Number(n) => (n.as_u64().unwrap_or(0) + 3).to_string(),
            J::Array(_) => "a, b".into(),
            J::Object(_) if key == "kafka" => "socket.timeout.ms=5000".into(),
            J::Object(_) => r#"{"store-9": {"replenishment_quantity": 5}}"#.into(),
            J::Null => "x".into(),
        }
    }

    #[test]
    fn every_key_is_set_by_its_variable() -> Result<(), ConfigError> {
        let defaults = serde_json::to_value(Settings::default()).expect("JSON");
        for key in env_keys() {
            let at = |v: &serde_json::Value| {
                key.path
                    .iter()
                    .try_fold(v.clone(), |v, p| v.get(p.as_str()).cloned())
                    .expect("key in settings")
            };
            let default = at(&defaults);
            let value = other_value(&default, &key.key());
            let mut s = Settings::default();
            s.apply_env(|k| (k == key.var).then(|| value.clone()))?;
            let got = at(&serde_json::to_value(&s).expect("JSON"));
            assert_ne!(got, default, "{} did not change {}", key.var, key.key());
        }
        Ok(())
    }

    #[test]
    fn lists_tables_and_numbers_parse_and_bad_values_name_the_variable() -> Result<(), ConfigError>
    {
        let mut s = Settings::default();
        s.kafka.insert("debug".into(), "broker".into());
        let env = |k: &str| match k {
            "ORDERFLOW_FRAUD_BLOCKED_CUSTOMERS" => Some("c-1, c-2,".to_string()),
            "ORDERFLOW_PAYMENT_RETRY_FACTOR" => Some("3".to_string()),
            "ORDERFLOW_KAFKA" => Some("socket.timeout.ms=5000".to_string()),
            "ORDERFLOW_ALERTS_STORES" => {
                Some(r#"{"s-off": {"replenishment_enabled": false}}"#.to_string())
            }
            _ => None,
        };
        s.apply_env(env)?;
        assert_eq!(s.fraud.blocked_customers, ["c-1", "c-2"]);
        assert_eq!(s.payment.retry_factor, 3.0);
        assert_eq!(s.kafka.len(), 2, "merged into the file's table");
        assert_eq!(s.alerts.replenishment_quantity("s-off"), None);
        for (var, value) in [
            ("ORDERFLOW_PAYMENT_CONCURRENCY", "-1"),
            ("ORDERFLOW_FRAUD_MAX_ORDER_TOTAL_CENTS", "lots"),
            ("ORDERFLOW_ALERTS_REPLENISHMENT_ENABLED", "maybe"),
            ("ORDERFLOW_ALERTS_STORES", r#"{"s": {"typo": 1}}"#),
            ("ORDERFLOW_KAFKA", "novalue"),
        ] {
            let err = Settings::default()
                .apply_env(|k| (k == var).then(|| value.to_string()))
                .expect_err(value);
            assert!(err.to_string().contains(var), "{err}");
        }
        Ok(())
    }

    #[test]
    fn the_old_gateway_variable_still_works_and_the_derived_one_wins() -> Result<(), ConfigError> {
        let mut s = Settings::default();
        s.apply_env(|k| (k == "ORDERFLOW_GATEWAY_URL").then(|| "http://old".to_string()))?;
        assert_eq!(s.payment.gateway_url, "http://old");
        s.apply_env(|k| match k {
            "ORDERFLOW_GATEWAY_URL" => Some("http://old".to_string()),
            "ORDERFLOW_PAYMENT_GATEWAY_URL" => Some("http://new".to_string()),
            _ => None,
        })?;
        assert_eq!(s.payment.gateway_url, "http://new");
        Ok(())
    }

    #[test]
    fn the_readme_settings_table_is_the_generated_one() {
        const BEGIN: &str = "<!-- settings table: generated by `config::settings_table` -->\n";
        const END: &str = "<!-- end of settings table -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let table = settings_table();
        for key in env_keys() {
            let row = table
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", key.key())))
                .unwrap_or_else(|| panic!("no row for {}", key.key()));
            assert!(!row.ends_with("|  |"), "{} has no doc comment", key.key());
        }
        let start = readme
            .find(BEGIN)
            .expect("the README marks its settings table")
            + BEGIN.len();
        let end = start + readme[start..].find(END).expect("the end of the table");
        if readme[start..end] != table {
            if std::env::var_os("ORDERFLOW_UPDATE_README").is_some() {
                let updated = format!("{}{table}{}", &readme[..start], &readme[end..]);
                std::fs::write(path, updated).expect("writing README.md");
            }
            panic!(
                "README.md's settings table is not the generated one; run \
                 `ORDERFLOW_UPDATE_README=1 cargo test --lib config::env_keys` to regenerate it"
            );
        }
    }

    #[test]
    fn no_kafka_client_is_configured_outside_the_settings() {
        fn visit(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).expect("src").flatten() {
                let p = entry.path();
                if p.is_dir() {
                    visit(&p, found);
                } else if p.extension().is_some_and(|e| e == "rs")
                    && !p.ends_with("config.rs")
                    && std::fs::read_to_string(&p)
                        .unwrap_or_default()
                        .contains(concat!("ClientConfig", "::new"))
                {
                    found.push(p.display().to_string());
                }
            }
        }
        let mut found = Vec::new();
        visit(
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "build Kafka clients with Settings::kafka_client: {found:?}"
        );
    }
}

#[cfg(test)]
mod example_file {
    #[test]
    fn the_example_settings_file_parses_to_the_defaults() -> Result<(), Box<dyn std::error::Error>>
    {
        let s: super::Settings = toml::from_str(include_str!("../deploy/orderflow.example.toml"))?;
        let d = super::Settings::default();
        assert_eq!(
            (s.partitions, s.batch_max_records, s.batch_interval_ms),
            (d.partitions, d.batch_max_records, d.batch_interval_ms)
        );
        assert_eq!(s.fraud, d.fraud);
        assert_eq!(s.inventory, d.inventory);
        assert_eq!(s.payment, d.payment);
        assert_eq!(s.fulfillment, d.fulfillment);
        assert_eq!(s.guarantee, d.guarantee);
        assert_eq!(s.database_url, d.database_url);
        assert_eq!(s.alerts, d.alerts);
        Ok(())
    }
}

#[cfg(test)]
mod consistency {
    use super::*;

    #[test]
    fn a_producer_limit_below_the_changelogs_records_is_refused_under_at_least_once() {
        let mut s = Settings {
            guarantee: Guarantee::AtLeastOnce,
            ..Settings::default()
        };
        assert!(s.check().is_ok(), "no limit set");
        s.kafka.insert("message.max.bytes".into(), "40000".into());
        let err = s.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("message.max.bytes (40000)"), "{err}");
        s.kafka.insert("message.max.bytes".into(), "1000000".into());
        assert!(s.check().is_ok());
        s.kafka.insert("message.max.bytes".into(), "lots".into());
        assert!(s.check().is_err());
        // Under exactly_once there is no outbox: an output too large for the producer
        // is dead-lettered in its place instead.
        s.guarantee = Guarantee::ExactlyOnce;
        s.kafka.insert("message.max.bytes".into(), "40000".into());
        assert!(s.check().is_ok());
    }
}
