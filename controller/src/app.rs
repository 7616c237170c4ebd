//! The application state every capability works over, and the controller as the set
//! of its capabilities' services.
//!
//! [`App`] holds what is shared: configuration, storage, the clock, the live sessions
//! and the agent link, counters and the task tracker. Each capability is a service of
//! its own ([`Agents`], [`Validations`], [`Control`], [`Metering`]) holding an
//! `Arc<App>` and only the state that is its own (the CA and revocation list, runs in
//! flight, instance locks, the usage queue). A new capability adds a service and a
//! field here; it does not extend one struct that everything else also extends.

use std::sync::Arc;

use surplus_certs::{CertAuthority, RevocationList};
use surplus_protocol::clock::Clock;

use crate::agents::Agents;
use crate::config::ControllerConfig;
use crate::control::Control;
use crate::link::AgentLink;
use crate::metering::Metering;
use crate::registry::Registry;
use crate::store::Store;
use crate::validation::Validations;

/// What every service shares.
#[derive(Debug)]
pub struct App {
    /// Configuration in force (listen addresses are the bound ones).
    pub config: ControllerConfig,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Wall clock.
    pub clock: Arc<dyn Clock>,
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// Calls to agents.
    pub link: AgentLink,
    /// Counters for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Every task of this controller, so that shutdown can wait for all of them.
    pub tasks: tokio_util::task::TaskTracker,
}

/// The controller: its shared state and one service per capability.
#[derive(Debug)]
pub struct Controller {
    /// The shared state.
    pub app: Arc<App>,
    /// Enrollment, certificates, revocation, join tokens, pings.
    pub agents: Agents,
    /// Validation runs.
    pub validation: Validations,
    /// The primary control interface (instances and volumes).
    pub control: Control,
    /// Usage ingest, metering periods and billing runs.
    pub metering: Metering,
    /// Resell requests and their pipelines.
    pub resell: crate::resell::Resell,
    /// Offers, quotes and reservations: the buying side.
    pub market: crate::market::Market,
    /// Signed-in browsers of the web console.
    pub console: crate::console::Sessions,
    /// Peering with other controllers and the links to them.
    pub federation: crate::federation::Federation,
}

impl Controller {
    /// A controller over `store` with `ca`; agents in `revoked` are refused.
    pub fn new(
        config: ControllerConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        ca: CertAuthority,
        revoked: RevocationList,
    ) -> Self {
        let registry = Arc::new(Registry::default());
        let link = AgentLink::new(registry.clone(), store.clone(), config.max_frame_size);
        let app = Arc::new(App {
            config,
            store,
            clock,
            registry,
            link,
            metrics: crate::metrics::Metrics::default(),
            tasks: tokio_util::task::TaskTracker::new(),
        });
        let validation = Validations::new(app.clone());
        let federation =
            crate::federation::Federation::new(app.clone(), ca.cert_pem(), ca.fingerprint());
        Self {
            federation,
            agents: Agents::new(app.clone(), ca, revoked),
            validation: validation.clone(),
            resell: crate::resell::Resell::new(app.clone(), validation),
            control: Control::new(app.clone()),
            market: crate::market::Market::new(app.clone()),
            metering: Metering::new(app.clone()),
            console: crate::console::Sessions::default(),
            app,
        }
    }
}
