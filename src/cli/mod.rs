//! The `orderflow` command line: one module per subcommand; doc comments are the help.
//! `anyhow` lives here, at the binary's edge, and nowhere in the library.

mod api;
pub mod dev;
mod dlq;
mod gateway;
mod lag;
mod load;
mod migrate;
mod ops;
mod replay;
mod run;
mod schemas;
mod seed;
mod topics;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;

/// OrderFlow: event-driven order orchestration on Kafka.
#[derive(Debug, Parser)]
#[command(name = "orderflow", version)]
pub struct Cli {
    /// Settings file (TOML); environment variables ORDERFLOW_* override it.
    #[arg(long, global = true, env = "ORDERFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides the settings file).
    #[arg(long, global = true, env = "ORDERFLOW_BROKERS")]
    pub brokers: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything in one process on embedded defaults, with demo stores and traffic.
    ///
    /// An in-memory Kafka (librdkafka's mock cluster), SQLite, a mock payment gateway,
    /// every stage and sink, the HTTP API and dashboard, seeded demo stores and gentle
    /// simulated traffic. Every start begins fresh: it deletes the database and state a
    /// previous `orderflow dev` left in --data-dir. The brokers and database settings do
    /// not apply (both are embedded); the others do. Ctrl-C stops it.
    Dev(dev::DevArgs),
    /// Run stage workers; several workers with the same group prefix share partitions.
    Run(run::RunArgs),
    /// Provision topics.
    #[command(subcommand)]
    Topics(topics::TopicsCommand),
    /// Run a mock payment gateway that behaves like a bank.
    Gateway(gateway::GatewayArgs),
    /// Publish realistic traffic and play the carrier for shipped orders.
    Load(load::LoadArgs),
    /// Stock the demo stores (the simulator's catalogue) on `inventory.commands`.
    ///
    /// A restock and a low-stock threshold per (store, SKU); the same run ID publishes the
    /// same commands, which the inventory stage applies once.
    Seed(seed::SeedArgs),
    /// Create or upgrade the read side's SQL tables (idempotent).
    Migrate(migrate::MigrateArgs),
    /// Process again what the topics retain: `--stage NAME --to-earliest` (or another
    /// strategy) moves a stage's or sink's inputs; `--rebuild SINK` rebuilds an SQL
    /// sink's tables from scratch.
    Replay(replay::ReplayArgs),
    /// Serve the HTTP API: orders, inventory commands, stats and alerts per store.
    Api(api::ApiArgs),
    /// OrderFlow's Avro schemas in a Confluent-compatible schema registry.
    #[command(subcommand)]
    Schemas(schemas::SchemasCommand),
    /// Dead letters: list, show one, redrive to their source topic.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Consumer lag per stage and sink, per input partition.
    Lag(lag::LagArgs),
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `orderflow dev` keeps its terminal for what a person watches: the runtime's
    // per-partition bookkeeping (claims, restores, assignments) only when asked for.
    init_tracing(match cli.command {
        Command::Dev(_) => "info,orderflow::runtime=warn,rdkafka=warn,sqlx=warn",
        _ => "info,rdkafka=warn,sqlx=warn",
    });
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(b) = cli.brokers {
        settings.brokers = b;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev::run(settings, args).await,
            Command::Run(args) => run::run(settings, args).await,
            Command::Seed(args) => seed::run(settings, args).await,
            Command::Topics(cmd) => topics::run(settings, cmd).await,
            Command::Gateway(args) => gateway::run(args).await,
            Command::Load(args) => load::run(settings, args).await,
            Command::Migrate(args) => migrate::run(settings, args).await,
            Command::Replay(args) => replay::run(settings, args).await,
            Command::Api(args) => api::run(settings, args).await,
            Command::Schemas(cmd) => schemas::run(settings, cmd).await,
            Command::Dlq(cmd) => dlq::run(settings, cmd).await,
            Command::Lag(args) => lag::run(settings, args).await,
        }
    })
}

/// Logs go to stderr; `ORDERFLOW_LOG_FORMAT=json` for structured logs, `RUST_LOG` filters.
fn init_tracing(default_filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(IgnoredPassThrough);
    if std::env::var("ORDERFLOW_LOG_FORMAT").as_deref() == Ok("json") {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .init();
    }
}

/// Drops librdkafka's warning that a consumer property "will be ignored by this
/// producer instance". The `kafka` pass-through map goes to every client by design, so
/// a consumer property in it (`orderflow dev` sets `fetch.wait.max.ms`) would otherwise
/// log that warning once per producer — one for every worker, the API, the simulator —
/// about a property that is doing its job on the consumers.
struct IgnoredPassThrough;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for IgnoredPassThrough {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 |= format!("{v:?}")
                        .contains("is a consumer property and will be ignored by this producer");
                }
            }
        }
        // librdkafka's logs arrive through the `log` bridge, whose metadata names the
        // bridge rather than librdkafka: only the level narrows it down.
        if *event.metadata().level() != tracing::Level::WARN {
            return true;
        }
        let mut m = Message(false);
        event.record(&mut m);
        !m.0
    }
}

/// Cancels the returned token on SIGINT or SIGTERM: shutdown is injected into workers,
/// never read from signals inside them.
pub(crate) fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}
