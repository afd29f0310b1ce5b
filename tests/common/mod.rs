//! Harness for integration tests and benchmarks against the real broker that
//! `scripts/test.sh` starts (nisshi on loopback).
//!
//! Invariant: every test gets its own topic prefix and consumer group, so tests run in
//! parallel on one broker without seeing each other's records; every wait is bounded by
//! a deadline and fails loudly with the worker logs, and there is no silent skip — without
//! `ORDERFLOW_TEST_BROKERS` every test panics (a test that owns its broker panics without
//! `ORDERFLOW_TEST_POSTGRES_URL` instead).
//!
//! The helpers are synchronous on purpose: a test reads like a script (produce, spawn
//! workers, wait for output, kill, assert) and blocking rdkafka calls need no runtime.
//! Not every test crate uses every helper, hence the `dead_code` allowance.
//!
//! Worker processes log to `target/test-logs/<prefix>-<instance>.log`, at `RUST_LOG=info`
//! unless `ORDERFLOW_TEST_WORKER_LOG` says otherwise (e.g. `orderflow=debug`).
//!
//! Submodules: [`nisshi`], a broker a test owns (to restart it); [`postgres`], the test
//! database server, throwaway databases and private clusters; [`pipeline`], the whole
//! order pipeline as end-to-end tests drive it; [`lifecycle`], order and stock events
//! built in code; [`txn_broker`], the transactional broker that `exactly_once` tests run
//! against; [`txn_log`], the fate of each record by the log's transaction markers.
#![allow(dead_code)]

pub mod lifecycle;
pub mod nisshi;
pub mod pipeline;
pub mod postgres;
pub mod registry;
pub mod txn_broker;
pub mod txn_log;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use orderflow::config::{Guarantee, Settings};
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, OrderScreened, ScreeningDecision, derive_id, order_created_id};
use orderflow::topics::{self, Topics};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// The broker every integration test runs against.
pub const BROKERS_VAR: &str = "ORDERFLOW_TEST_BROKERS";

/// Bootstrap servers of the test broker. Panics (never skips) when unset: a test that
/// silently passes without a broker proves nothing.
pub fn broker() -> String {
    match std::env::var(BROKERS_VAR) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{BROKERS_VAR} is not set: integration tests and benchmarks need a Kafka-protocol \
             broker. Run them with `bash scripts/test.sh` (tests) or `bash scripts/bench.sh` \
             (benchmarks), which start nisshi on a free loopback port and export {BROKERS_VAR}; \
             or start a broker yourself and export {BROKERS_VAR}=host:port."
        ),
    }
}

/// Short random lowercase hex, for names that must not collide across tests and runs.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `Instant::now() + secs`.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// Runs a future of the library (topic provisioning) to completion from synchronous code.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// librdkafka properties handed to every worker (and kept in [`TestEnv::settings`]):
/// a SIGKILLed worker's partitions move to a live one after this session timeout,
/// instead of librdkafka's default 45 s.
pub const WORKER_KAFKA: &[(&str, &str)] = &[
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "500"),
];

/// How often a worker commits a batch in tests; small, so output shows up quickly.
pub const BATCH_INTERVAL_MS: u64 = 50;

/// One test's isolated deployment on the shared broker.
pub struct TestEnv {
    /// Used in log file names.
    pub name: String,
    pub settings: Settings,
    pub partitions: i32,
    spawned: Mutex<u32>,
}

impl TestEnv {
    /// A fresh prefix (`t<uuid>.`) and group prefix, with every topic created with
    /// `partitions` partitions, on the shared test broker.
    pub fn new(name: &str, partitions: i32) -> TestEnv {
        TestEnv::on(name, partitions, &broker())
    }

    /// Like [`new`](Self::new), on the broker at `brokers` (a test that owns its broker,
    /// see [`nisshi::OwnedBroker`]).
    pub fn on(name: &str, partitions: i32, brokers: &str) -> TestEnv {
        TestEnv::with_guarantee(name, partitions, brokers, Guarantee::AtLeastOnce)
    }

    /// Like [`on`](Self::on), with workers that run under `guarantee` (see
    /// [`TestEnv::exactly_once`] for the transactional broker).
    pub fn with_guarantee(
        name: &str,
        partitions: i32,
        brokers: &str,
        guarantee: Guarantee,
    ) -> TestEnv {
        let id = unique();
        let settings = Settings {
            brokers: brokers.to_owned(),
            topic_prefix: format!("t{id}."),
            guarantee,
            group_prefix: format!("g{id}"),
            instance_id: format!("{name}-harness"),
            partitions,
            replication_factor: 1,
            batch_interval_ms: BATCH_INTERVAL_MS,
            http_addr: "127.0.0.1:0".into(),
            kafka: WORKER_KAFKA
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Settings::default()
        };
        // The admin client needs no consumer properties; leaving them out avoids
        // librdkafka's "consumer property ignored" warnings.
        let admin_settings = Settings {
            kafka: BTreeMap::new(),
            ..settings.clone()
        };
        let outcomes = block_on(orderflow::admin::create_topics(&admin_settings, partitions))
            .unwrap_or_else(|e| {
                panic!(
                    "creating the topics of test {name} on {}: {e}",
                    settings.brokers
                )
            });
        // A fresh prefix: every topic must be new, or the test would read old records.
        assert!(
            !outcomes.is_empty()
                && outcomes
                    .iter()
                    .all(|(_, o)| *o == orderflow::admin::TopicOutcome::Created),
            "test {name}: expected every topic to be created afresh, got {outcomes:?}"
        );
        let env = TestEnv {
            name: name.to_owned(),
            settings,
            partitions,
            spawned: Mutex::new(0),
        };
        // Producing right after CreateTopics can race the metadata; wait until every topic
        // we use reports all its partitions.
        for base in [topics::ORDER_CREATED, topics::ORDER_SCREENED, topics::DLQ] {
            wait_for_partitions_on(&env.settings.brokers, &env.topic(base), partitions);
        }
        env
    }

    pub fn topics(&self) -> Topics {
        self.settings.topics()
    }

    /// The prefixed name of a topic constant of `orderflow::topics`.
    pub fn topic(&self, base: &str) -> String {
        self.topics().name(base)
    }

    pub fn producer(&self) -> TestProducer {
        TestProducer::new(&self.settings.brokers)
    }

    /// A producer that accepts records up to `bytes` (librdkafka's `message.max.bytes`).
    pub fn producer_with_max_bytes(&self, bytes: usize) -> TestProducer {
        TestProducer::with(
            &self.settings.brokers,
            &[("message.max.bytes", bytes.to_string())],
        )
    }

    /// A reader of every record of the prefixed `base` topic, from the beginning.
    pub fn collector(&self, base: &str) -> Collector {
        Collector::new(&self.settings.brokers, &self.topic(base))
    }

    /// Starts `orderflow run --stages fraud` as a separate process in this test's group.
    pub fn spawn_fraud_worker(&self, fraud: &FraudOpts) -> Worker {
        let env = [
            (
                "ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS",
                fraud.velocity_max_orders.to_string(),
            ),
            (
                "ORDERFLOW_FRAUD_VELOCITY_WINDOW_SECS",
                fraud.velocity_window_secs.to_string(),
            ),
        ];
        self.spawn_worker(&["fraud"], &env)
    }

    /// Starts `orderflow run` for `stages` (every stage when empty) as a separate process
    /// in this test's group, with `env` added to the worker's environment.
    pub fn spawn_worker(&self, stages: &[&str], env: &[(&str, String)]) -> Worker {
        self.spawn_worker_with_kafka(stages, env, "")
    }

    /// Like [`TestEnv::spawn_worker`], with extra librdkafka properties (`k=v,k=v`)
    /// after the harness's own.
    pub fn spawn_worker_with_kafka(
        &self,
        stages: &[&str],
        env: &[(&str, String)],
        extra_kafka: &str,
    ) -> Worker {
        let n = self.next_spawn();
        let instance = format!("{}-w{n}", self.name);
        let log_path = self.log_path(&instance);
        self.start_process(instance, log_path, 1, stages, env, extra_kafka)
    }

    /// SIGKILLs `worker` (if it still runs) and starts `stages` again under the same
    /// instance ID, as a deployment restarts a crashed worker. Under `exactly_once` the
    /// transactional ID is the same too, so the new process fences the old one's producer
    /// and aborts the transaction it left open. Logs to a file of its own.
    pub fn restart_worker(&self, worker: &mut Worker, stages: &[&str], env: &[(&str, String)]) {
        worker.kill9();
        self.next_spawn();
        let incarnation = worker.incarnation + 1;
        let log_path = self.log_path(&format!("{}.{incarnation}", worker.instance));
        *worker = self.start_process(
            worker.instance.clone(),
            log_path,
            incarnation,
            stages,
            env,
            "",
        );
    }

    fn next_spawn(&self) -> u32 {
        let mut n = self.spawned.lock().expect("spawn counter");
        *n += 1;
        *n
    }

    fn log_path(&self, instance: &str) -> PathBuf {
        let dir = test_log_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        dir.join(format!(
            "{}-{}.log",
            self.settings.topic_prefix.trim_end_matches('.'),
            instance
        ))
    }

    /// Starts an `orderflow` command other than `run` (`gateway`, `load`, …) as a separate
    /// process with this test's settings (brokers, topic and group prefixes, guarantee,
    /// librdkafka properties) and `env`; `label` names it in its instance ID and log file.
    /// The returned [`Worker`] is the process, whatever the command.
    pub fn spawn_orderflow(&self, label: &str, args: &[&str], env: &[(&str, String)]) -> Worker {
        let n = self.next_spawn();
        let instance = format!("{}-{label}{n}", self.name);
        let log_path = self.log_path(&instance);
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        self.launch(instance, log_path, 1, &args, env, "")
    }

    fn start_process(
        &self,
        instance: String,
        log_path: PathBuf,
        incarnation: u32,
        stages: &[&str],
        env: &[(&str, String)],
        extra_kafka: &str,
    ) -> Worker {
        let mut args = vec!["run".to_owned()];
        if !stages.is_empty() {
            args.extend(["--stages".to_owned(), stages.join(",")]);
        }
        self.launch(instance, log_path, incarnation, &args, env, extra_kafka)
    }

    fn launch(
        &self,
        instance: String,
        log_path: PathBuf,
        incarnation: u32,
        args: &[String],
        env: &[(&str, String)],
        extra_kafka: &str,
    ) -> Worker {
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("clone log file handle");
        // The client ID names the instance, so the group's member list shows which
        // workers have joined (see `wait_for_group`).
        let mut kafka: Vec<String> = self
            .settings
            .kafka
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        kafka.push(format!("client.id={instance}"));
        kafka.extend(
            extra_kafka
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(str::to_owned),
        );

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
        cmd.args(args);
        // Only what this test says: no ORDERFLOW_* leaking in from the caller's shell.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ORDERFLOW_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("ORDERFLOW_BROKERS", &self.settings.brokers)
            .env("ORDERFLOW_TOPIC_PREFIX", &self.settings.topic_prefix)
            .env("ORDERFLOW_GUARANTEE", self.settings.guarantee.to_string())
            .env("ORDERFLOW_HTTP_ADDR", "127.0.0.1:0")
            .env("ORDERFLOW_INSTANCE_ID", &instance)
            .env("ORDERFLOW_GROUP_PREFIX", &self.settings.group_prefix)
            .env(
                "ORDERFLOW_BATCH_INTERVAL_MS",
                self.settings.batch_interval_ms.to_string(),
            )
            .env(
                "ORDERFLOW_BATCH_LINGER_MS",
                self.settings.batch_linger_ms.to_string(),
            )
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("ORDERFLOW_KAFKA", kafka.join(","))
            .env(
                "RUST_LOG",
                std::env::var("ORDERFLOW_TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", env!("CARGO_BIN_EXE_orderflow")));
        eprintln!(
            "[{}] started {} {instance} (pid {}, {}), log {}",
            self.name,
            if args.first().map(String::as_str) == Some("run") {
                "worker".to_owned()
            } else {
                format!("`orderflow {}`", args.join(" "))
            },
            child.id(),
            self.settings.guarantee,
            log_path.display()
        );
        Worker {
            instance,
            incarnation,
            log_path,
            child: Mutex::new(child),
        }
    }
}

/// Fraud settings a test worker gets through the environment.
#[derive(Debug, Clone, Copy)]
pub struct FraudOpts {
    pub velocity_max_orders: u32,
    pub velocity_window_secs: u64,
}

impl Default for FraudOpts {
    /// High enough that velocity never triggers for the unique customers of most tests.
    fn default() -> Self {
        FraudOpts {
            velocity_max_orders: 1000,
            velocity_window_secs: 3600,
        }
    }
}

/// `target/test-logs/`, next to Cargo's `target/tmp`.
pub fn test_log_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("test-logs")
}

/// A worker process; SIGKILLed (and reaped) when dropped, so a failing test leaves no
/// process behind.
pub struct Worker {
    pub instance: String,
    /// 1 for the first process of this instance ID, then one more per restart.
    pub incarnation: u32,
    pub log_path: PathBuf,
    child: Mutex<Child>,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.child.lock().expect("child").id()
    }

    /// SIGKILL (`Child::kill` sends SIGKILL on Unix): no shutdown hook, no final commit.
    pub fn kill9(&mut self) {
        let child = self.child.get_mut().expect("child");
        if let Ok(None) = child.try_wait() {
            child
                .kill()
                .unwrap_or_else(|e| panic!("SIGKILL {}: {e}", self.instance));
        }
        let _ = child.wait();
        eprintln!("killed worker {} with SIGKILL", self.instance);
    }

    /// Stops the process as an operator would: SIGTERM (it finishes what it has in
    /// flight, commits and leaves its group), then SIGKILL if it has not exited within
    /// `grace`. Returns whether it exited on SIGTERM.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        if self.exit_status().is_some() {
            return true;
        }
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        let until = Instant::now() + grace;
        while sent && Instant::now() < until {
            if self.exit_status().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not exit within {:.0} s of SIGTERM",
            self.instance,
            grace.as_secs_f64()
        );
        self.kill9();
        false
    }

    /// How the process ended, if it has (without waiting).
    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.child.lock().expect("child").try_wait().ok().flatten()
    }

    /// Panics with the log tail if the process exited on its own.
    pub fn assert_alive(&self) {
        let status = self.child.lock().expect("child").try_wait();
        match status {
            Ok(None) => {}
            Ok(Some(status)) => panic!(
                "worker {} exited unexpectedly with {status}; log {}:\n{}",
                self.instance,
                self.log_path.display(),
                self.log_tail(60)
            ),
            Err(e) => panic!("cannot check worker {}: {e}", self.instance),
        }
    }

    /// The last `lines` lines of the worker's stdout and stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path, lines)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// The last `lines` lines of a file (reads at most its last 64 KiB).
pub fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Calls `step` until it returns `Some`, checking that `workers` are still running; past
/// `deadline` it panics with `what`, the last progress note `step` left in `progress`, and
/// the workers' log tails.
pub fn wait_for<T>(
    what: &str,
    deadline: Instant,
    workers: &[&Worker],
    mut step: impl FnMut(&mut String) -> Option<T>,
) -> T {
    let started = Instant::now();
    let mut progress = String::new();
    loop {
        if let Some(v) = step(&mut progress) {
            eprintln!(
                "{what}: done after {:.1}s ({progress})",
                started.elapsed().as_secs_f64()
            );
            return v;
        }
        for w in workers {
            w.assert_alive();
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = workers
                .iter()
                .map(|w| {
                    format!(
                        "--- worker {} ({}) ---\n{}",
                        w.instance,
                        w.log_path.display(),
                        w.log_tail(40)
                    )
                })
                .collect();
            panic!(
                "timed out after {:.1}s waiting for {what}; progress: {progress}\n{}",
                started.elapsed().as_secs_f64(),
                logs.join("\n")
            );
        }
    }
}

/// Waits until the cluster metadata of the shared test broker shows `partitions`
/// partitions for `topic`.
pub fn wait_for_partitions(topic: &str, partitions: i32) {
    wait_for_partitions_on(&broker(), topic, partitions);
}

/// Waits until the cluster metadata of `brokers` shows `partitions` partitions for `topic`.
pub fn wait_for_partitions_on(brokers: &str, topic: &str, partitions: i32) {
    let consumer: BaseConsumer = plain_config(brokers).create().expect("metadata client");
    let until = deadline(30);
    loop {
        let seen = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|md| {
                md.topics()
                    .first()
                    .map(|t| (t.error(), t.partitions().len() as i32))
            });
        if let Some((None, n)) = seen
            && n == partitions
        {
            return;
        }
        assert!(
            Instant::now() < until,
            "topic {topic} never showed {partitions} partitions (last seen: {seen:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn plain_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// Produces like an ordinary client: keyed by store ID, Kafka's default key partitioner
/// (`murmur2_random`, as the Java client), idempotent so that a store's records keep
/// their order.
pub struct TestProducer {
    inner: FutureProducer,
}

/// One record to produce.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Outgoing {
    pub fn new(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Outgoing {
            key: key.into(),
            value: value.into(),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
}

/// Where a produced record landed, and its timestamp (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
}

impl TestProducer {
    pub fn new(brokers: &str) -> Self {
        Self::with(brokers, &[])
    }

    /// With `extra` librdkafka properties.
    pub fn with(brokers: &str, extra: &[(&str, String)]) -> Self {
        let mut c = plain_config(brokers);
        c.set("partitioner", "murmur2_random")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        for (k, v) in extra {
            c.set(*k, v);
        }
        let inner = c
            .create()
            .unwrap_or_else(|e| panic!("creating a producer for {brokers}: {e}"));
        TestProducer { inner }
    }

    /// Produces one record and waits for its acknowledgement.
    pub fn send(&self, topic: &str, rec: &Outgoing) -> Landed {
        self.send_all(topic, std::slice::from_ref(rec))[0]
    }

    /// Produces every record, in order (per key), and waits for all acknowledgements.
    pub fn send_all(&self, topic: &str, recs: &[Outgoing]) -> Vec<Landed> {
        self.send_paced(topic, recs, None)
    }

    /// Like [`send_all`](Self::send_all), but with `per_second`, the i-th record is not
    /// handed to the client before `i / per_second` seconds: a steady stream rather than a
    /// burst. Timestamps are the client's create time, i.e. when each record was handed
    /// over.
    pub fn send_paced(
        &self,
        topic: &str,
        recs: &[Outgoing],
        per_second: Option<f64>,
    ) -> Vec<Landed> {
        self.send_paced_counted(topic, recs, per_second, &AtomicUsize::new(0))
    }

    /// Like [`send_paced`](Self::send_paced), adding one to `handed` as each record is
    /// handed to the client, so that another thread can follow a long stream.
    pub fn send_paced_counted(
        &self,
        topic: &str,
        recs: &[Outgoing],
        per_second: Option<f64>,
        handed: &AtomicUsize,
    ) -> Vec<Landed> {
        let started = Instant::now();
        let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(recs.len());
        for (i, rec) in recs.iter().enumerate() {
            if let Some(rate) = per_second {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
            for (k, v) in &rec.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut record = FutureRecord::to(topic)
                .key(&rec.key)
                .payload(&rec.value)
                .headers(headers);
            let until = deadline(60);
            loop {
                match self.inner.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        handed.fetch_add(1, AtomicOrdering::Relaxed);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        assert!(
                            Instant::now() < until,
                            "producer queue stayed full for 60 s on {topic}"
                        );
                        record = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => panic!("producing to {topic}: {e}"),
                }
            }
        }
        pending
            .into_iter()
            .map(|f| match futures::executor::block_on(f) {
                Ok(Ok(d)) => Landed {
                    partition: d.partition,
                    offset: d.offset,
                    timestamp: d.timestamp.to_millis(),
                },
                Ok(Err((e, _))) => panic!("delivery to {topic} failed: {e}"),
                Err(_) => panic!("producer dropped a delivery report for {topic}"),
            })
            .collect()
    }
}

/// A record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds; create time unless the topic says log-append time.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Rec {
    pub fn key_str(&self) -> Option<String> {
        self.key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads every record of one topic from the beginning, without a consumer group
/// (assign, not subscribe), accumulating what it has seen.
pub struct Collector {
    pub topic: String,
    consumer: BaseConsumer,
    partitions: i32,
    /// Next offset to read, per partition.
    next: HashMap<i32, i64>,
    pub records: Vec<Rec>,
}

impl Collector {
    pub fn new(brokers: &str, topic: &str) -> Self {
        Collector::with_isolation(brokers, topic, "read_committed")
    }

    /// A reader that is also handed the records of open and aborted transactions.
    pub fn read_uncommitted(brokers: &str, topic: &str) -> Self {
        Collector::with_isolation(brokers, topic, "read_uncommitted")
    }

    fn with_isolation(brokers: &str, topic: &str, isolation: &str) -> Self {
        // librdkafka's consumer needs a group ID even for `assign`; this one never joins
        // (no subscribe) and never commits.
        let consumer: BaseConsumer = plain_config(brokers)
            .set("group.id", format!("reader-{}", unique()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .set("isolation.level", isolation)
            .create()
            .unwrap_or_else(|e| panic!("creating a consumer of {topic}: {e}"));
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
        let partitions = md
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len() as i32);
        assert!(
            partitions > 0,
            "topic {topic} has no partitions; was it created?"
        );
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition offset");
        }
        consumer
            .assign(&tpl)
            .unwrap_or_else(|e| panic!("assigning {topic}: {e}"));
        Collector {
            topic: topic.to_owned(),
            consumer,
            partitions,
            next: HashMap::new(),
            records: Vec::new(),
        }
    }

    /// Polls for up to `max_wait`; returns how many records arrived (they are appended
    /// to `records`).
    pub fn poll(&mut self, max_wait: Duration) -> usize {
        let start = self.records.len();
        let until = Instant::now() + max_wait;
        let mut wait = max_wait.min(Duration::from_millis(100));
        while Instant::now() < until {
            match self.consumer.poll(wait) {
                Some(Ok(m)) => {
                    let headers = m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    self.next.insert(m.partition(), m.offset() + 1);
                    self.records.push(Rec {
                        partition: m.partition(),
                        offset: m.offset(),
                        timestamp: m.timestamp().to_millis(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers,
                    });
                    // Keep taking what is already fetched without waiting.
                    wait = Duration::ZERO;
                }
                Some(Err(e)) => {
                    eprintln!("consumer of {}: {e}", self.topic);
                    wait = Duration::from_millis(50);
                }
                None => {
                    wait = until
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(100));
                }
            }
        }
        self.records.len() - start
    }

    /// Reads up to the current end of every partition (the high watermarks as of now).
    pub fn drain(&mut self) {
        let mut high = Vec::new();
        for p in 0..self.partitions {
            let (_, hi) = self
                .consumer
                .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("watermarks of {}/{p}: {e}", self.topic));
            high.push((p, hi));
        }
        let until = deadline(60);
        while high.iter().any(|(p, hi)| self.read_up_to(*p) < *hi) {
            assert!(
                Instant::now() < until,
                "could not read {} up to its high watermarks {high:?} within 60 s (at {:?})",
                self.topic,
                self.next
            );
            self.poll(Duration::from_millis(100));
        }
    }

    /// The next offset to read of partition `p`: past the last record read, or past a
    /// transaction marker after it (markers take an offset but are never handed out; the
    /// consumer's position moves past them).
    fn read_up_to(&self, p: i32) -> i64 {
        let position = self
            .consumer
            .position()
            .ok()
            .and_then(|tpl| {
                tpl.find_partition(&self.topic, p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
            })
            .unwrap_or(0);
        self.next.get(&p).copied().unwrap_or(0).max(position)
    }
}

/// Reads every record of `topic` up to its current end.
pub fn read_topic(brokers: &str, topic: &str) -> Vec<Rec> {
    let mut c = Collector::new(brokers, topic);
    c.drain();
    c.records
}

/// Reads `topic` from the beginning until it holds `expected` records or `deadline`
/// passes (then panics), and returns everything up to the end at that moment.
pub fn read_all(brokers: &str, topic: &str, expected: usize, deadline: Instant) -> Vec<Rec> {
    let mut c = Collector::new(brokers, topic);
    wait_for(
        &format!("{expected} records on {topic}"),
        deadline,
        &[],
        |progress| {
            c.poll(Duration::from_millis(200));
            *progress = format!("{} records", c.records.len());
            (c.records.len() >= expected).then_some(())
        },
    );
    c.drain();
    c.records
}

// ---------------------------------------------------------------------------------------
// Orders and screenings.

/// An order as a test publishes it, per the producer contract.
#[derive(Debug, Clone)]
pub struct TestOrder {
    pub order_id: String,
    pub store_id: String,
    pub customer_id: String,
    pub placed_at_ms: i64,
    /// Line count 1..=3 and prices vary with the order, all far below the fraud limit.
    pub lines: u32,
}

impl TestOrder {
    pub fn new(
        order_id: impl Into<String>,
        store_id: impl Into<String>,
        customer_id: impl Into<String>,
        placed_at_ms: i64,
    ) -> Self {
        let order_id = order_id.into();
        let lines = 1 + (order_id.bytes().map(u32::from).sum::<u32>() % 3);
        TestOrder {
            order_id,
            store_id: store_id.into(),
            customer_id: customer_id.into(),
            placed_at_ms,
            lines,
        }
    }

    pub fn json_value(&self) -> serde_json::Value {
        let items: Vec<serde_json::Value> = (0..self.lines)
            .map(|i| serde_json::json!({"sku": format!("SKU-{}", i + 1), "quantity": i + 1, "unit_price_cents": 999 + 100 * i64::from(i)}))
            .collect();
        serde_json::json!({
            "order_id": self.order_id,
            "store_id": self.store_id,
            "customer_id": self.customer_id,
            "email": format!("{}@example.com", self.customer_id),
            "currency": "USD",
            "shipping_country": "US",
            "items": items,
            "placed_at": rfc3339(self.placed_at_ms),
        })
    }

    /// The JSON bytes a producer would send.
    pub fn json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.json_value()).expect("order JSON")
    }

    pub fn outgoing(&self) -> Outgoing {
        Outgoing::new(self.store_id.clone(), self.json())
    }

    /// The event ID the codec gives this order's `OrderCreated`.
    pub fn created_id(&self) -> String {
        order_created_id(&self.store_id, &self.order_id).to_string()
    }

    /// The deterministic ID of the fraud stage's single output for this order.
    pub fn expected_screened_id(&self) -> String {
        derive_id(&self.created_id(), "fraud", 0).to_string()
    }
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("valid timestamp")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One `OrderScreened` record as read from the output topic.
#[derive(Debug, Clone)]
pub struct Screening {
    pub event: OrderScreened,
    pub key: Option<String>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
}

impl Screening {
    pub fn event_id(&self) -> &str {
        &self.event.envelope.event_id
    }

    pub fn approved(&self) -> bool {
        self.event.decision == ScreeningDecision::Approved
    }
}

/// Every screening seen so far, decoded with the library's codec, grouped by order.
pub struct Screenings {
    codec: Codec,
    /// Records ingested, duplicates included.
    pub records: usize,
    pub by_order: BTreeMap<String, Vec<Screening>>,
}

impl Default for Screenings {
    fn default() -> Self {
        Screenings {
            codec: Codec::new(),
            records: 0,
            by_order: BTreeMap::new(),
        }
    }
}

impl Screenings {
    /// Decodes and files new records; an output that does not decode as `OrderScreened`
    /// fails the test.
    pub fn ingest(&mut self, recs: &[Rec]) {
        for r in recs {
            let value = r.value.as_deref().unwrap_or_else(|| {
                panic!(
                    "order.screened record at {}/{} has no value",
                    r.partition, r.offset
                )
            });
            let header = r.header_str("event-type");
            let hints = DecodeHints {
                header_type: header.as_deref(),
                topic_default: Some(orderflow::events::EventType::OrderScreened),
                ..DecodeHints::default()
            };
            let event = match self.codec.decode(value, hints) {
                Ok(Event::OrderScreened(e)) => e,
                Ok(other) => panic!(
                    "order.screened record at {}/{} is a {}, not OrderScreened",
                    r.partition,
                    r.offset,
                    other.event_type()
                ),
                Err(e) => panic!(
                    "order.screened record at {}/{} does not decode: {e}",
                    r.partition, r.offset
                ),
            };
            let order_id = event.envelope.order_id.clone().unwrap_or_else(|| {
                panic!("OrderScreened {} has no order ID", event.envelope.event_id)
            });
            self.records += 1;
            self.by_order.entry(order_id).or_default().push(Screening {
                event,
                key: r.key_str(),
                partition: r.partition,
                offset: r.offset,
                timestamp: r.timestamp,
            });
        }
    }

    pub fn distinct_orders(&self) -> usize {
        self.by_order.len()
    }

    pub fn distinct_ids(&self, order_id: &str) -> BTreeSet<&str> {
        self.by_order
            .get(order_id)
            .map(|v| v.iter().map(Screening::event_id).collect())
            .unwrap_or_default()
    }

    /// Records beyond the first of each event ID: redelivery the at-least-once contract
    /// allows (consumers dedupe by event ID).
    pub fn duplicate_records(&self) -> usize {
        let distinct: usize = self
            .by_order
            .keys()
            .map(|o| self.distinct_ids(o).len())
            .sum();
        self.records - distinct
    }

    /// The first screening of an order (all screenings of an order are checked to carry
    /// one event ID by [`assert_screened_exactly`]).
    pub fn get(&self, order_id: &str) -> Option<&Screening> {
        self.by_order.get(order_id).and_then(|v| v.first())
    }
}

/// Checks the output against the input, order by order: every order screened, under
/// exactly one event ID — the deterministic one — keyed by its store, on the partition
/// its input was on; no screening of an order that was never published. Returns how many
/// records were duplicates (same event ID again).
pub fn assert_screened_exactly(
    s: &Screenings,
    orders: &[TestOrder],
    input_partition: &HashMap<String, i32>,
) -> usize {
    let expected: BTreeSet<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|o| !s.by_order.contains_key(*o))
        .collect();
    let unexpected: Vec<&String> = s
        .by_order
        .keys()
        .filter(|o| !expected.contains(o.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} orders were never screened, e.g. {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        unexpected.is_empty(),
        "screenings of orders never published: {unexpected:?}"
    );
    let mut several = Vec::new();
    for o in orders {
        let ids = s.distinct_ids(&o.order_id);
        if ids.len() != 1 {
            several.push((o.order_id.clone(), ids.len()));
            continue;
        }
        for sc in &s.by_order[&o.order_id] {
            assert_eq!(
                sc.event_id(),
                o.expected_screened_id(),
                "order {}: the screening's event ID is not UUIDv5(OrderCreated ID, fraud, 0)",
                o.order_id
            );
            assert_eq!(
                sc.event.envelope.store_id, o.store_id,
                "order {}: store ID",
                o.order_id
            );
            assert_eq!(
                sc.event.customer_id, o.customer_id,
                "order {}: customer ID",
                o.order_id
            );
            assert_eq!(
                sc.event.envelope.causation_id.as_deref(),
                Some(o.created_id().as_str()),
                "order {}: causation ID must be the OrderCreated's event ID",
                o.order_id
            );
            assert_eq!(
                sc.key.as_deref(),
                Some(o.store_id.as_str()),
                "order {}: output key must be the store ID",
                o.order_id
            );
            if let Some(p) = input_partition.get(&o.order_id) {
                assert_eq!(
                    sc.partition, *p,
                    "order {}: output partition differs from the input's (co-partitioning by store)",
                    o.order_id
                );
            }
        }
    }
    assert!(
        several.is_empty(),
        "{} orders have more than one distinct screening event ID (double effect), e.g. {:?}",
        several.len(),
        &several[..several.len().min(10)]
    );
    s.duplicate_records()
}

/// Follows `order.screened`, decoding as records arrive.
pub struct ScreenedTail {
    pub collector: Collector,
    pub screenings: Screenings,
    ingested: usize,
}

impl ScreenedTail {
    pub fn new(env: &TestEnv) -> Self {
        ScreenedTail {
            collector: env.collector(topics::ORDER_SCREENED),
            screenings: Screenings::default(),
            ingested: 0,
        }
    }

    /// Polls for up to `max_wait` and decodes what arrived.
    pub fn poll(&mut self, max_wait: Duration) {
        self.collector.poll(max_wait);
        self.ingest_new();
    }

    /// Reads to the current end of the topic and decodes everything.
    pub fn drain(&mut self) {
        self.collector.drain();
        self.ingest_new();
    }

    fn ingest_new(&mut self) {
        let new = &self.collector.records[self.ingested..];
        self.screenings.ingest(new);
        self.ingested = self.collector.records.len();
    }

    pub fn distinct_orders(&self) -> usize {
        self.screenings.distinct_orders()
    }

    /// Waits until at least `n` distinct orders are screened.
    pub fn wait_for_orders(&mut self, n: usize, deadline: Instant, workers: &[&Worker]) {
        wait_for(
            &format!("{n} distinct screened orders"),
            deadline,
            workers,
            |progress| {
                self.poll(Duration::from_millis(50));
                *progress = format!(
                    "{} distinct orders screened, {} records",
                    self.screenings.distinct_orders(),
                    self.screenings.records
                );
                (self.screenings.distinct_orders() >= n).then_some(())
            },
        );
    }
}

/// The state of the fraud stage's consumer group and its members' client IDs, as the
/// broker describes it (`None` while the group is unknown).
pub fn fraud_group(env: &TestEnv) -> Option<(String, BTreeSet<String>)> {
    stage_group(env, "fraud")
}

/// The state of a stage's consumer group and its members' client IDs.
pub fn stage_group(env: &TestEnv, stage: &str) -> Option<(String, BTreeSet<String>)> {
    let consumer: BaseConsumer = plain_config(&env.settings.brokers)
        .create()
        .expect("admin consumer");
    let group = env.settings.group_id(stage);
    let list = consumer
        .fetch_group_list(Some(&group), Duration::from_secs(5))
        .ok()?;
    list.groups().iter().find(|g| g.name() == group).map(|g| {
        (
            g.state().to_owned(),
            g.members().iter().map(member_client_id).collect(),
        )
    })
}

/// A member's client ID. nisshi leaves the described `client_id` empty, but like Kafka
/// it names members `<client.id>-<uuid>`, so the member ID tells it too.
fn member_client_id(m: &rdkafka::groups::GroupMemberInfo) -> String {
    if !m.client_id().is_empty() {
        return m.client_id().to_owned();
    }
    let id = m.id();
    match id.len().checked_sub(37) {
        Some(end)
            if id.as_bytes()[end] == b'-' && uuid::Uuid::parse_str(&id[end + 1..]).is_ok() =>
        {
            id[..end].to_owned()
        }
        _ => id.to_owned(),
    }
}

/// Waits until the fraud group is `Stable` with exactly `workers` as members: each has
/// joined and holds its assignment, and no killed worker is still counted.
pub fn wait_for_group(env: &TestEnv, deadline: Instant, workers: &[&Worker]) {
    let group = env.settings.group_id("fraud");
    let want: BTreeSet<String> = workers.iter().map(|w| w.instance.clone()).collect();
    wait_for(
        &format!("group {group} stable with members {want:?}"),
        deadline,
        workers,
        |progress| {
            let g = fraud_group(env);
            *progress = format!("{g:?}");
            if matches!(&g, Some((state, members)) if state == "Stable" && *members == want) {
                Some(())
            } else {
                std::thread::sleep(Duration::from_millis(200));
                None
            }
        },
    );
}

/// Waits until `stage`'s group is `Stable` with `members` members.
pub fn wait_for_group_members(env: &TestEnv, stage: &str, members: usize, deadline: Instant) {
    wait_for(
        &format!("{stage} group stable with {members} members"),
        deadline,
        &[],
        |progress| {
            let g = stage_group(env, stage);
            *progress = format!("{g:?}");
            if matches!(&g, Some((state, m)) if state == "Stable" && m.len() == members) {
                Some(())
            } else {
                std::thread::sleep(Duration::from_millis(200));
                None
            }
        },
    );
}

/// The partition of `key` among `partitions` under the Java client's partitioner
/// (`murmur2_random` in librdkafka), which the tests' producers and the workers use.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    let data = key.as_bytes();
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() == 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions as u32) as i32
}

/// `per` store names (`store-N`) on each of `partitions` partitions, in order of N.
pub fn stores_on_every_partition(per: usize, partitions: i32) -> Vec<String> {
    let mut on: Vec<Vec<String>> = vec![Vec::new(); partitions as usize];
    let mut n = 0;
    while on.iter().any(|s| s.len() < per) {
        let name = format!("store-{n}");
        let p = partition_of(&name, partitions) as usize;
        if on[p].len() < per {
            on[p].push(name);
        }
        n += 1;
    }
    on.into_iter().flatten().collect()
}
