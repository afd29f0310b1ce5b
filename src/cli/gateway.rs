//! `orderflow gateway`: runs the mock payment gateway (see [`crate::gateway::server`])
//! until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Args;

use crate::gateway::server::{self, Gateway, GatewayConfig};

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on; port 0 picks a free one (the bound address is logged).
    /// The payment stage's `payment.gateway_url` must point here.
    #[arg(long, env = "ORDERFLOW_GATEWAY_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: String,
    #[command(flatten)]
    pub config: GatewayConfig,
}

pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let shutdown = super::shutdown_on_signal();
    let gateway = Gateway::new(args.config.clone()).context("invalid gateway settings")?;
    let (addr, handle) = server::serve_gateway(&args.addr, gateway, shutdown)
        .await
        .with_context(|| format!("binding the gateway address {}", args.addr))?;
    let outages: Vec<String> = args.config.outages.iter().map(|w| w.to_string()).collect();
    tracing::info!(
        %addr,
        latency_ms = args.config.latency_ms,
        jitter_ms = args.config.jitter_ms,
        decline_rate = args.config.decline_rate,
        transient_error_rate = args.config.transient_error_rate,
        outages = %outages.join(","),
        seed = args.config.seed,
        "mock payment gateway on http://{addr} (ledger: /v1/ledger, outage switch: /admin/outage)"
    );
    handle.await.context("the gateway server task failed")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: GatewayArgs,
    }

    #[test]
    fn the_documented_command_line_parses() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from([
            "gateway",
            "--addr",
            "127.0.0.1:0",
            "--latency-ms",
            "20",
            "--jitter-ms",
            "10",
            "--decline-rate",
            "0.05",
            "--transient-error-rate",
            "0.2",
            "--outage",
            "30s..35s",
            "--outage",
            "1m..61s",
            "--seed",
            "7",
        ])?;
        let c = &cli.args.config;
        assert_eq!(cli.args.addr, "127.0.0.1:0");
        assert_eq!((c.latency_ms, c.jitter_ms, c.seed), (20, 10, 7));
        assert_eq!((c.decline_rate, c.transient_error_rate), (0.05, 0.2));
        assert_eq!(
            c.outages
                .iter()
                .map(|w| (w.start, w.end))
                .collect::<Vec<_>>(),
            vec![
                (Duration::from_secs(30), Duration::from_secs(35)),
                (Duration::from_secs(60), Duration::from_secs(61)),
            ]
        );
        Ok(())
    }

    #[test]
    fn defaults_are_a_perfect_bank_and_bad_values_are_refused() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from(["gateway"])?;
        assert_eq!(cli.args.config, GatewayConfig::default());
        let err = Cli::try_parse_from(["gateway", "--decline-rate", "1.5"]).unwrap_err();
        assert!(err.to_string().contains("between 0 and 1"), "{err}");
        let err = Cli::try_parse_from(["gateway", "--outage", "10s..5s"]).unwrap_err();
        assert!(err.to_string().contains("end after"), "{err}");
        Ok(())
    }
}
