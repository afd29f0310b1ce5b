//! OrderFlow: an event-driven order orchestration engine — Kafka stream processors that
//! move every order through fraud screening, stock, payment, fulfillment and delivery.
//!
//! # Layout
//!
//! - [`config`]: settings — defaults, then file, then `ORDERFLOW_*` environment.
//! - [`topics`]: every topic name, behind one prefix; which event goes where.
//! - [`events`]: wire types for every Avro schema in `schemas/`, deterministic IDs, the codec.
//! - [`stages`]: pure business logic, one file per stage, and the `Stage` contract.
//! - [`runtime`]: the consume-transform-produce loop — transactions or at-least-once
//!   commits, state changelogs and restore, timers, dead letters, shutdown.
//! - [`metrics`]: every metric name and label, and the `/metrics` + `/health` server.
//! - [`status`]: an order's status, derived from its events.
//! - [`views`]: the SQL sinks' pure half — projector, stats and alerts as row operations.
//! - [`sql`]: the SQL sinks' database half — PostgreSQL or SQLite, migrations, fenced
//!   commits of row operations with their offsets, and the read queries.
//! - [`api`]: the HTTP API (`orderflow api`) — orders, inventory commands, stats and alerts
//!   per store, with one route table behind both the router and the OpenAPI document.
//! - [`gateway`]: the payment gateway's HTTP client, and a mock gateway server.
//! - [`simulator`]: realistic traffic, and a carrier that scans shipped orders.
//! - [`admin`]: topic provisioning.
//! - [`ops`]: the operators' verbs' pure half — replay plans and requests, dead-letter
//!   filters and redrive rules, lag.
//! - [`cli`]: the `orderflow` command line, one module per subcommand.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod cli;
pub mod config;
pub mod events;
pub mod gateway;
pub mod metrics;
pub mod ops;
pub mod runtime;
pub mod simulator;
pub mod sql;
pub mod stages;
pub mod status;
pub mod topics;
pub mod views;
