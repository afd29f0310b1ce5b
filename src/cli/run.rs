//! `orderflow run`: stage workers in this process, plus `/metrics` and `/health`.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::config::Settings;
use crate::gateway::client::GatewayClient;
use crate::metrics::{self, Health, Metrics};
use crate::runtime::{self, RuntimeError, clock::SystemClock};
use crate::sql::Db;
use crate::stages::StageName;
use crate::stages::delivery::DeliveryStage;
use crate::stages::fraud::FraudStage;
use crate::stages::fulfillment::FulfillmentStage;
use crate::stages::inventory::InventoryStage;
use crate::stages::payment::PaymentStage;
use crate::views::Sink;

/// What one worker thread runs: a pipeline stage or an SQL sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Stage(StageName),
    Sink(Sink),
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Stage(s) => s.as_str(),
            Role::Sink(s) => s.name(),
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(sink) = Sink::from_name(s) {
            return Ok(Role::Sink(sink));
        }
        s.parse::<StageName>().map(Role::Stage).map_err(|_| {
            let stages: Vec<_> = StageName::ALL.iter().map(|n| n.as_str()).collect();
            let sinks: Vec<_> = Sink::ALL.iter().map(|n| n.name()).collect();
            format!(
                "unknown stage {s:?}; stages: {}; SQL sinks: {}",
                stages.join(", "),
                sinks.join(", ")
            )
        })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    // The help names every stage and sink from their own lists: see `stages_help`.
    #[arg(long, value_delimiter = ',', value_parser = role_parser(), hide_possible_values = true,
          help = stages_help())]
    pub stages: Vec<Role>,
}

/// Every name `--stages` takes, from the stages' and sinks' own lists.
fn role_names() -> Vec<&'static str> {
    StageName::ALL
        .iter()
        .map(|s| s.as_str())
        .chain(Sink::ALL.iter().map(|s| s.name()))
        .collect()
}

fn role_parser() -> impl clap::builder::TypedValueParser<Value = Role> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(role_names())
        .map(|s| s.parse::<Role>().expect("every possible value is a role"))
}

/// The `--stages` help, naming every stage and sink (generated, so it cannot drift).
fn stages_help() -> String {
    let stages: Vec<_> = StageName::ALL.iter().map(|n| n.as_str()).collect();
    let sinks: Vec<_> = Sink::ALL.iter().map(|n| n.name()).collect();
    format!(
        "Stages to run, comma-separated (default: every pipeline stage). \
         Pipeline stages: {}. \
         SQL sinks: {} (they write to ORDERFLOW_DATABASE_URL, whose migrations are applied \
         at start-up).",
        stages.join(", "),
        sinks.join(", ")
    )
}

pub async fn run(settings: Settings, args: RunArgs) -> anyhow::Result<()> {
    let stages = if args.stages.is_empty() {
        StageName::ALL.iter().copied().map(Role::Stage).collect()
    } else {
        args.stages
    };
    if stages.iter().any(|r| matches!(r, Role::Sink(_))) {
        let db = Db::connect(&settings.database_url).await?;
        db.migrate().await?;
        db.close().await;
    }
    let shutdown = super::shutdown_on_signal();
    let metrics = Metrics::new();
    let health = Health::default();
    let (addr, http) = metrics::serve(
        &settings.http_addr,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("binding the HTTP endpoint {}", settings.http_addr))?;
    tracing::info!(%addr, "metrics on http://{addr}/metrics, health on http://{addr}/health/ready");
    let workers = Workers::start(&stages, &settings, &metrics, shutdown.clone())?;
    health.set_ready(true);
    let result = workers.join(&health, &shutdown).await;
    shutdown.cancel();
    let _ = http.await;
    result.map_err(Into::into)
}

/// Stage and sink workers started together, each on its own thread, stopped by one
/// token. `orderflow run` starts one set; `orderflow dev` starts the stages and the sinks
/// as two sets, to stop them one after the other.
pub(super) struct Workers {
    roles: Vec<Role>,
    handles: Vec<std::thread::JoinHandle<Result<(), RuntimeError>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Workers {
    /// Spawns a worker per role; `stop` stops them all.
    pub(super) fn start(
        roles: &[Role],
        settings: &Settings,
        metrics: &Metrics,
        stop: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Workers> {
        let mut handles = Vec::with_capacity(roles.len());
        for role in roles {
            match spawn_stage(*role, settings, metrics, stop.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Those already running stop before the error is reported.
                    stop.cancel();
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Workers {
            roles: roles.to_vec(),
            handles,
            stop,
        })
    }

    /// Waits until every worker has returned. The first one to fail (or panic) marks
    /// `health` not ready and cancels `on_failure` and the workers' own token: one
    /// stage failing stops the process, since a half-running process hides problems.
    /// Workers are watched all at once, so a failure is acted on when it happens, not
    /// when the workers started before it return. Returns the first error.
    pub(super) async fn join(
        self,
        health: &Health,
        on_failure: &tokio_util::sync::CancellationToken,
    ) -> Result<(), RuntimeError> {
        use futures::StreamExt;
        let mut running: futures::stream::FuturesUnordered<_> = self
            .roles
            .iter()
            .zip(self.handles)
            .map(|(role, handle)| {
                let name = role.as_str();
                async move {
                    tokio::task::spawn_blocking(move || handle.join())
                        .await
                        .expect("joining a worker thread")
                        .unwrap_or(Err(RuntimeError::Panicked(name)))
                }
            })
            .collect();
        let mut first_error: Option<RuntimeError> = None;
        while let Some(result) = running.next().await {
            if let Err(e) = result {
                health.set_ready(false);
                self.stop.cancel();
                on_failure.cancel();
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The one place a stage or sink name becomes a running worker.
fn spawn_stage(
    role: Role,
    settings: &Settings,
    metrics: &Metrics,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<Result<(), RuntimeError>>> {
    let clock = Arc::new(SystemClock);
    let (s, m) = (settings.clone(), metrics.clone());
    let name = match role {
        Role::Sink(sink) => return Ok(runtime::sink::spawn(sink, s, m, clock, shutdown)),
        Role::Stage(name) => name,
    };
    Ok(match name {
        StageName::Fraud => runtime::spawn(FraudStage::new(s.fraud.clone()), s, m, clock, shutdown),
        StageName::Inventory => runtime::spawn(
            InventoryStage::new(s.inventory.clone()),
            s,
            m,
            clock,
            shutdown,
        ),
        StageName::Payment => {
            let gateway =
                GatewayClient::new(&s.payment).context("building the payment gateway client")?;
            let stage = PaymentStage::new(s.payment.clone());
            runtime::spawn_with_effects(stage, s, m, clock, Some(Arc::new(gateway)), shutdown)
        }
        StageName::Fulfillment => runtime::spawn(
            FulfillmentStage::new(s.fulfillment.clone()),
            s,
            m,
            clock,
            shutdown,
        ),
        StageName::Delivery => runtime::spawn(DeliveryStage::new(), s, m, clock, shutdown),
    })
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn run_help_names_every_stage_and_sink() {
        let mut cli = crate::cli::Cli::command();
        let run = cli.find_subcommand_mut("run").expect("a run subcommand");
        let help = run.render_long_help().to_string();
        for name in super::role_names() {
            assert!(help.contains(name), "{name} missing from:\n{help}");
        }
        assert!(help.contains("Pipeline stages: fraud, inventory"), "{help}");
        let short = run.render_help().to_string();
        assert!(short.contains("SQL sinks: projector"), "{short}");
    }

    #[test]
    fn an_unknown_stage_is_refused_with_the_names() {
        let err = crate::cli::Cli::try_parse_from(["orderflow", "run", "--stages", "fraud,frud"])
            .expect_err("frud is no stage");
        let msg = err.to_string();
        assert!(msg.contains("frud") && msg.contains("inventory"), "{msg}");
    }
}
