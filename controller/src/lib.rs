//! The Surplus controller.
//!
//! - [`app`]: the shared state ([`app::App`]) and the [`Controller`] as one service per
//!   capability: [`agents`] (enroll, renew, revoke, join tokens), [`validation`],
//!   [`control`], [`metering`]. Every call to an agent goes through [`link`].
//! - [`server`]: QUIC session and enrollment endpoints, HTTP API, maintenance loop.
//! - [`control`]: the primary control interface: parsing, authorisation, routing to agents.
//! - [`registry`]: live sessions, liveness and uptime rules (pure).
//! - [`store`]: storage behind one trait; SQLite embedded.
//! - [`http`]: the HTTP/JSON API; its bodies are the `surplus-api` crate's (shared
//!   with the CLI).
//! - [`datadir`]: CA, server certificate, database and config on disk.
//! - [`demo`]: a controller and a local agent in one process.

pub mod agents;
pub mod app;
pub mod brokerage;
pub mod config;
pub mod console;
pub mod control;
pub mod datadir;
#[cfg(feature = "demo")]
pub mod demo;
pub mod federation;
pub mod http;
pub mod link;
pub mod market;
pub mod metering;
pub mod metrics;
pub mod notices;
pub mod registry;
pub mod resell;
pub mod server;
pub mod store;
pub mod validation;

pub use surplus_market::{acceptance, billing, ledger};

pub use app::{App, Controller};
pub use config::ControllerConfig;
pub use server::{RunningController, start};

pub use surplus_runtime::init_logs;

/// Parses `key=value` label arguments.
pub fn parse_labels(args: &[String]) -> anyhow::Result<store::Labels> {
    args.iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("label {kv:?} is not key=value"))?;
            surplus_protocol::control::validate_label(k, v)
                .map_err(|e| anyhow::anyhow!("label {kv:?}: {}", e.reason))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}
