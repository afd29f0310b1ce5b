//! `orderflow dev`: the whole system in one process on embedded defaults — librdkafka's
//! in-process mock cluster for the log, SQLite for the read side, the mock payment
//! gateway, every stage and sink, the HTTP API, and the simulator's traffic and carrier.
//!
//! Everything runs through the same code as the separate commands: the workers through
//! [`super::run::Workers`] (as `orderflow run`), the API through [`crate::api::serve`]
//! (as `orderflow api`), the gateway through [`gateway::server::serve_gateway`], the
//! seeding through [`super::seed::seed`] and the traffic through
//! [`simulator::run_load`] and [`simulator::play_carrier`].
//!
//! Invariant: each run starts fresh. The mock cluster's log lives in this process's
//! memory, so a database or stage state left by an earlier run describes a log that is
//! gone; the files a dev run owns in its data directory (the SQLite database and the
//! state directory) are deleted at start, under a lock that keeps two dev processes off
//! one directory. Shutdown goes from the edge inwards: traffic, stages, sinks, API,
//! gateway — each stops after what feeds it, so what is in flight is committed.
//!
//! # The mock cluster under `exactly_once`
//!
//! The mock runs transactions but keeps no transactional offset commits, shows every
//! record to every reader whatever `isolation.level` says (its last stable offset is the
//! log's end, and it writes no transaction markers), and fences no zombies. In this one
//! process that is sound, for these reasons:
//!
//! - Stage workers never rely on group offsets: each partition's input positions live
//!   in its changelog state, written in the same transaction as its outputs. The
//!   restore's group-offset check (`runtime::restore`, `Restorer::vouch`) asks the group
//!   which changelog batch committed last; on the mock every offset comes back unset,
//!   which that check reads as "no information" and takes the last batch read for
//!   committed. That is the right answer here: the mock has already shown that batch's
//!   outputs to every consumer, so its state must stand with them (leaving it out would
//!   make the stage decide its inputs a second time against outputs already seen).
//! - The only restore that reads anything is one after a rebalance or a failed batch in
//!   this same process (each run starts with empty changelogs), and a redone batch
//!   re-emits the same event IDs, which every consumer deduplicates.
//! - One worker per stage, with one instance ID, runs against this cluster, and a
//!   rebuilt producer replaces its predecessor in the same worker: there is no zombie
//!   for the broker to fence.
//!
//! What it cannot give: a batch that aborts stays visible, so a stage with several
//! inputs that decided a redone batch differently (inventory, after an abort) would
//! leave consumers with the first decision. Nothing aborts on the in-process mock unless
//! errors are injected; an abort is logged as a warning ("transaction failed").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio_util::sync::CancellationToken;

use super::run::{Role, Workers};
use super::seed::{self, Catalogue};
use crate::api::{self, ApiOptions, ApiState};
use crate::config::{FulfillmentSettings, Guarantee, Settings};
use crate::gateway::server::{self as gateway, Gateway, GatewayConfig};
use crate::metrics::{self, Health, Metrics};
use crate::simulator::{self, CarrierConfig, LoadConfig, SimError};
use crate::sql::Db;
use crate::stages::StageName;
use crate::views::Sink;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Port of the HTTP API and the dashboard on 127.0.0.1; 0 picks a free port (the
    /// address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Orders per second the simulator places at the demo stores (it also plays the
    /// carrier); 0: no traffic, only what is posted to the API.
    #[arg(long, default_value_t = 2.0)]
    pub load: f64,
    /// Directory of the SQLite database (`orderflow.db`) and the stages' local state
    /// (`state/`). Every start deletes what the previous `orderflow dev` left there —
    /// the embedded log lives in memory, so that data would describe a log that is gone
    /// — and nothing else.
    #[arg(long, default_value = "orderflow-data")]
    pub data_dir: PathBuf,
    /// Partitions of every topic on the embedded log (default: the `partitions` setting).
    #[arg(long)]
    pub partitions: Option<i32>,
    #[command(flatten)]
    pub catalogue: Catalogue,
}

/// The database file a dev run owns in its data directory, with SQLite's companions.
const DB_FILE: &str = "orderflow.db";
const DB_COMPANIONS: [&str; 3] = ["-wal", "-shm", "-journal"];
/// The stages' local state files.
const STATE_DIR: &str = "state";
/// Held while a dev run uses the directory.
const LOCK_FILE: &str = "orderflow-dev.lock";
/// Orders per traffic round; each round plants one fraudulent burst and one huge order.
const ROUND_ORDERS: u64 = 100;

/// The mock bank's behaviour in dev: quick, with a few declines and transient failures
/// so that retries and compensation show.
pub fn gateway_config() -> GatewayConfig {
    GatewayConfig {
        latency_ms: 20,
        jitter_ms: 40,
        decline_rate: 0.03,
        transient_error_rate: 0.1,
        outages: Vec::new(),
        seed: 7,
    }
}

/// The simulated carrier in dev: an order goes from ready to ship to its door in about
/// a second and a half; a few deliveries fail (and are refunded).
pub fn carrier_config() -> CarrierConfig {
    CarrierConfig {
        scan_interval: Duration::from_millis(400),
        delivery_failure_rate: 0.03,
        seed: 7,
        ..CarrierConfig::default()
    }
}

/// Picking and packing in dev, unless the settings file or the environment set them:
/// half a second each, so an order is delivered a few seconds after it is placed.
pub fn fulfillment() -> FulfillmentSettings {
    FulfillmentSettings {
        pick_ms: 500,
        pack_ms: 500,
    }
}

/// What the data directory held before this run cleared it.
struct DataDir {
    path: PathBuf,
    /// Keeps other dev runs off the directory while this one lives.
    _lock: std::fs::File,
    cleared: Vec<String>,
}

/// Creates (or takes over) the data directory and deletes what an earlier dev run left.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<DataDir> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let path = dir
        .canonicalize()
        .with_context(|| format!("resolving the data directory {}", dir.display()))?;
    let lock = std::fs::File::create(path.join(LOCK_FILE))
        .with_context(|| format!("creating {}", path.join(LOCK_FILE).display()))?;
    if let Err(e) = lock.try_lock() {
        anyhow::bail!(
            "another orderflow dev is using {} ({e}); stop it or pass another --data-dir",
            path.display()
        );
    }
    let mut cleared = Vec::new();
    let db = std::iter::once(DB_FILE.to_owned())
        .chain(DB_COMPANIONS.iter().map(|s| format!("{DB_FILE}{s}")));
    for name in db {
        let file = path.join(&name);
        if file.exists() {
            std::fs::remove_file(&file)
                .with_context(|| format!("deleting the previous run's {}", file.display()))?;
            cleared.push(name);
        }
    }
    let state = path.join(STATE_DIR);
    if state.exists() {
        std::fs::remove_dir_all(&state)
            .with_context(|| format!("deleting the previous run's {}", state.display()))?;
        cleared.push(format!("{STATE_DIR}/"));
    }
    Ok(DataDir {
        path,
        _lock: lock,
        cleared,
    })
}

/// The settings of a dev run: `base` (defaults, file, environment) with the embedded
/// parts put in.
fn dev_settings(mut base: Settings, brokers: String, data: &Path, partitions: i32) -> Settings {
    base.brokers = brokers;
    base.guarantee = Guarantee::ExactlyOnce;
    base.partitions = partitions;
    base.database_url = format!("sqlite://{}", data.join(DB_FILE).display());
    base.state_dir = data.join(STATE_DIR).display().to_string();
    if base.fulfillment == FulfillmentSettings::default() {
        base.fulfillment = fulfillment();
    }
    // The mock answers a fetch that finds nothing only after `fetch.wait.max.ms`, and
    // serves a connection's requests in order; so every blocking request a worker makes
    // on its consumer (positioning a partition's inputs asks for offsets and watermarks)
    // waits behind a long poll. At librdkafka's 500 ms that made the sinks, with nine
    // inputs, take some ten seconds to position six partitions; at 50 ms, one or two.
    // (The mock neither wakes a waiting fetch when records arrive, so the shorter wait
    // also shortens every hop of an order through the stages.)
    base.kafka
        .entry("fetch.wait.max.ms".to_owned())
        .or_insert_with(|| "50".to_owned());
    base
}

pub async fn run(settings: Settings, args: DevArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if !(args.load >= 0.0 && args.load.is_finite()) {
        anyhow::bail!("--load must be a non-negative number of orders per second");
    }
    let partitions = args.partitions.unwrap_or(settings.partitions);
    if partitions < 1 {
        anyhow::bail!("--partitions must be at least 1");
    }
    let shutdown = super::shutdown_on_signal();
    let data = prepare_data_dir(&args.data_dir)?;

    // Declared before every client so that it is dropped after them.
    let mock: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    let settings = dev_settings(settings, mock.bootstrap_servers(), &data.path, partitions);
    // The mock does not implement CreateTopics; it creates topics through its own API.
    for (topic, _compacted) in settings.topics().all() {
        mock.create_topic(&topic, partitions, 1)
            .with_context(|| format!("creating {topic} on the mock cluster"))?;
    }

    let db = Db::connect(&settings.database_url).await?;
    db.migrate().await?;

    // The API binds first, so that a port in use stops the start before anything runs.
    // The HTTP endpoints go last at shutdown: they answer while the workers stop.
    let api_stop = CancellationToken::new();
    let state = ApiState::new(
        &settings,
        db.clone(),
        ApiOptions::default(),
        api_stop.clone(),
    )
    .context("creating the API's Kafka producer")?;
    let api_addr = format!("127.0.0.1:{}", args.port);
    let (bound, api_task) = api::serve(&api_addr, state, api_stop.clone())
        .await
        .with_context(|| format!("binding {api_addr} (choose another with --port)"))?;

    let gateway_stop = CancellationToken::new();
    let gw = Gateway::new(gateway_config()).context("the dev gateway settings")?;
    let (gateway_addr, gateway_task) =
        gateway::serve_gateway("127.0.0.1:0", gw, gateway_stop.clone())
            .await
            .context("binding the mock payment gateway")?;
    let mut settings = settings;
    settings.payment.gateway_url = format!("http://{gateway_addr}");

    // Stock before traffic, as `orderflow seed` publishes it.
    let seeded = seed::seed(&settings, &args.catalogue, seed::DEFAULT_RUN_ID, &shutdown)
        .await
        .context("seeding the demo inventory")?;

    let metrics = Metrics::new();
    let health = Health::default();
    let (metrics_addr, metrics_task) = metrics::serve(
        "127.0.0.1:0",
        metrics.clone(),
        health.clone(),
        api_stop.clone(),
    )
    .await
    .context("binding the workers' metrics endpoint")?;

    let stages: Vec<Role> = StageName::ALL.iter().copied().map(Role::Stage).collect();
    let sinks: Vec<Role> = Sink::ALL.iter().copied().map(Role::Sink).collect();
    let stage_stop = CancellationToken::new();
    let sink_stop = CancellationToken::new();
    let stage_workers = Workers::start(&stages, &settings, &metrics, stage_stop.clone())?;
    let sink_workers = match Workers::start(&sinks, &settings, &metrics, sink_stop.clone()) {
        Ok(w) => w,
        Err(e) => {
            stage_stop.cancel();
            let _ = stage_workers.join(&health, &shutdown).await;
            return Err(e);
        }
    };
    health.set_ready(true);
    let stage_join = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move { stage_workers.join(&health, &shutdown).await })
    };
    let sink_join = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move { sink_workers.join(&health, &shutdown).await })
    };

    let traffic_stop = CancellationToken::new();
    let carrier = {
        let (settings, stop) = (settings.clone(), traffic_stop.clone());
        tokio::spawn(async move {
            let played = simulator::play_carrier(&settings, carrier_config(), stop).await;
            if let Err(e) = &played {
                tracing::error!(error = %e, "the simulated carrier stopped; orders will not be delivered");
            }
            played
        })
    };
    let traffic = (args.load > 0.0).then(|| {
        let (settings, stop) = (settings.clone(), traffic_stop.clone());
        let (catalogue, rate) = (args.catalogue.clone(), args.load);
        tokio::spawn(async move {
            let placed = traffic(&settings, &catalogue, rate, &stop).await;
            if let Err(e) = &placed {
                tracing::error!(error = %e, "the simulated traffic stopped");
            }
            placed
        })
    });

    print_banner(&Banner {
        api: bound,
        metrics: metrics_addr,
        gateway: gateway_addr,
        data: &data,
        settings: &settings,
        catalogue: &args.catalogue,
        seeded,
        load: args.load,
        started,
    });

    shutdown.cancelled().await;
    force_exit_on_second_signal();
    let mut failures: Vec<anyhow::Error> = Vec::new();

    traffic_stop.cancel();
    if let Some(t) = traffic {
        match t.await {
            Ok(Ok(orders)) => tracing::info!(orders, "traffic stopped"),
            Ok(Err(e)) => failures.push(anyhow::Error::new(e).context("the traffic")),
            Err(e) => failures.push(anyhow::anyhow!("the traffic task: {e}")),
        }
    }
    match carrier.await {
        Ok(Ok(r)) => tracing::info!(
            delivered = r.delivered,
            failed = r.failed,
            "carrier stopped"
        ),
        Ok(Err(e)) => failures.push(anyhow::Error::new(e).context("the carrier")),
        Err(e) => failures.push(anyhow::anyhow!("the carrier task: {e}")),
    }
    stage_stop.cancel();
    match stage_join.await {
        Ok(Ok(())) => tracing::info!("stages stopped"),
        Ok(Err(e)) => failures.push(anyhow::Error::new(e).context("a stage")),
        Err(e) => failures.push(anyhow::anyhow!("joining the stages: {e}")),
    }
    sink_stop.cancel();
    match sink_join.await {
        Ok(Ok(())) => tracing::info!("sinks stopped"),
        Ok(Err(e)) => failures.push(anyhow::Error::new(e).context("a sink")),
        Err(e) => failures.push(anyhow::anyhow!("joining the sinks: {e}")),
    }
    api_stop.cancel();
    if let Err(e) = api_task.await {
        failures.push(anyhow::anyhow!("the API server task: {e}"));
    }
    gateway_stop.cancel();
    if let Err(e) = gateway_task.await {
        failures.push(anyhow::anyhow!("the gateway task: {e}"));
    }
    let _ = metrics_task.await;
    db.close().await;
    drop(mock);
    match failures.into_iter().next() {
        Some(e) => Err(e),
        None => {
            tracing::info!("orderflow dev stopped");
            Ok(())
        }
    }
}

/// Orders at `rate` per second until `stop`, in rounds of [`ROUND_ORDERS`] with a run
/// ID each (order IDs are the producer's and must not repeat), over the seeded
/// catalogue; returns how many were published.
async fn traffic(
    settings: &Settings,
    catalogue: &Catalogue,
    rate: f64,
    stop: &CancellationToken,
) -> Result<u64, SimError> {
    let stamp = chrono::Utc::now().format("%H%M%S");
    let mut published = 0;
    let mut round: u64 = 0;
    while !stop.is_cancelled() {
        let mut plan = catalogue.plan(settings, &format!("dev{stamp}-{round}"));
        // The seed stays (it also prices the catalogue); the run ID makes each round's
        // orders and customers new.
        plan.orders = ROUND_ORDERS;
        plan.fraud_customers = 1;
        plan.huge_orders = 1;
        let config = LoadConfig {
            plan,
            rate,
            stock: false,
            cancel_rate: 0.0,
        };
        published += simulator::run_load(settings, &config, false, stop)
            .await?
            .orders;
        round += 1;
        if !stop.is_cancelled() {
            // One line per round, not per order.
            tracing::info!(
                orders = published,
                "traffic: {published} orders placed so far"
            );
        }
    }
    Ok(published)
}

/// A second Ctrl-C while shutting down ends the process at once.
fn force_exit_on_second_signal() {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("second interrupt: exiting without finishing the shutdown");
            std::process::exit(130);
        }
    });
}

struct Banner<'a> {
    api: SocketAddr,
    metrics: SocketAddr,
    gateway: SocketAddr,
    data: &'a DataDir,
    settings: &'a Settings,
    catalogue: &'a Catalogue,
    seeded: u64,
    load: f64,
    started: Instant,
}

/// What is running and where, on stdout (logs go to stderr). Tests and scripts read the
/// address from the `orderflow dev listening on` line.
fn print_banner(b: &Banner<'_>) {
    let api = format!("http://{}", b.api);
    let fresh = if b.data.cleared.is_empty() {
        "fresh".to_owned()
    } else {
        format!(
            "started fresh: deleted the previous run's {}",
            b.data.cleared.join(", ")
        )
    };
    let traffic = if b.load > 0.0 {
        format!(
            "{} orders/s over the demo stores, with fraud and out-of-stock cases; the simulator plays the carrier",
            b.load
        )
    } else {
        "none (--load 0); the simulator plays the carrier for orders posted to the API".to_owned()
    };
    let c = b.catalogue;
    println!("orderflow dev listening on {api}");
    println!("  dashboard  {api}/");
    println!(
        "  API        {api}  (OpenAPI: {api}/openapi.json; scope requests with X-Store-ID: store-001)"
    );
    println!(
        "  metrics    {api}/metrics (API), http://{}/metrics (stages and sinks)",
        b.metrics
    );
    println!(
        "  health     {api}/readyz, http://{}/health/ready",
        b.metrics
    );
    println!("  data dir   {} ({fresh})", b.data.path.display());
    println!(
        "  embedded   log: librdkafka mock cluster in memory ({} partitions, {}); SQL: SQLite {}; payment gateway: mock bank on http://{}",
        b.settings.partitions,
        b.settings.guarantee,
        b.data.path.join(DB_FILE).display(),
        b.gateway
    );
    println!(
        "  running    stages fraud, inventory, payment, fulfillment, delivery; sinks projector, stats, alerts"
    );
    println!(
        "  inventory  {} commands: store-001..store-{:03} × SKU-00001..SKU-{:05}",
        b.seeded, c.stores, c.skus
    );
    println!("  traffic    {traffic}");
    println!(
        "ready in {:.1}s; every start begins with an empty log and database. Ctrl-C stops it.",
        b.started.elapsed().as_secs_f64()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_clears_only_what_a_dev_run_owns_and_one_run_holds_the_directory()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        std::fs::write(d.join("orderflow.db"), b"old")?;
        std::fs::write(d.join("orderflow.db-wal"), b"old")?;
        std::fs::create_dir_all(d.join("state/worker-1-00000000"))?;
        std::fs::write(d.join("state/worker-1-00000000/fraud-0"), b"old")?;
        std::fs::write(d.join("notes.txt"), b"mine")?;
        std::fs::write(d.join("orderflow.db.bak"), b"mine")?;

        let first = prepare_data_dir(d)?;
        assert_eq!(
            first.cleared,
            vec!["orderflow.db", "orderflow.db-wal", "state/"]
        );
        assert!(!d.join("orderflow.db").exists() && !d.join("state").exists());
        assert_eq!(std::fs::read(d.join("notes.txt"))?, b"mine");
        assert_eq!(std::fs::read(d.join("orderflow.db.bak"))?, b"mine");

        // While one run holds the directory, another is refused and deletes nothing.
        std::fs::write(d.join("orderflow.db"), b"in use")?;
        let err = prepare_data_dir(d).err().expect("a second run is refused");
        assert!(err.to_string().contains("another orderflow dev"), "{err}");
        assert_eq!(std::fs::read(d.join("orderflow.db"))?, b"in use");

        drop(first);
        let again = prepare_data_dir(d)?;
        assert_eq!(again.cleared, vec!["orderflow.db"]);
        Ok(())
    }

    #[test]
    fn dev_settings_embed_the_log_the_database_and_the_state() {
        let s = dev_settings(
            Settings::default(),
            "127.0.0.1:1".into(),
            Path::new("/data"),
            3,
        );
        assert_eq!(s.brokers, "127.0.0.1:1");
        assert_eq!(s.guarantee, Guarantee::ExactlyOnce);
        assert_eq!(s.partitions, 3);
        assert_eq!(s.database_url, "sqlite:///data/orderflow.db");
        assert_eq!(s.state_dir, "/data/state");
        assert_eq!(s.fulfillment, fulfillment());
        assert_eq!(
            s.kafka.get("fetch.wait.max.ms").map(String::as_str),
            Some("50")
        );
        // Fulfillment timing set by the settings file or the environment is kept.
        let mut own = Settings::default();
        own.fulfillment.pick_ms = 3_000;
        let s = dev_settings(own, "b".into(), Path::new("/data"), 3);
        assert_eq!(s.fulfillment.pick_ms, 3_000);
    }
}
