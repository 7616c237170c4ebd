//! Validation runs.

use serde::{Deserialize, Serialize};

use uuid::Uuid;

use crate::ValidationRun;

/// What to run, as the API and CLI ask for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ValidationOptions {
    /// Run the benchmark suite.
    pub bench: bool,
    /// Run the security checks.
    pub security: bool,
    /// Small benchmark sizes (a smoke test, not a measurement).
    pub quick: bool,
    /// Benchmark time budget, such as `60s`.
    pub budget: String,
    /// Timed repetitions of each measurement.
    pub repetitions: u32,
    /// Bytes for the network throughput probe.
    pub network_bytes: u64,
}

impl Default for ValidationOptions {
    fn default() -> Self {
        Self {
            bench: true,
            security: true,
            quick: false,
            budget: "60s".into(),
            repetitions: 5,
            network_bytes: 16 << 20,
        }
    }
}

/// A run as the API shows it: the stored record plus live progress while running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunView {
    /// The stored run.
    #[serde(flatten)]
    pub run: ValidationRun,
    /// Latest progress, while running.
    pub progress: Option<surplus_protocol::messages::ValidationProgress>,
}

/// `GET /v1/agents/{id}/validation` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunHistory {
    /// The newest run that ended, if any.
    pub latest: Option<RunView>,
    /// Runs, newest first (at most 100).
    pub history: Vec<RunView>,
}

/// `POST /v1/validations/{run}/cancel` answer (202).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Cancelling {
    /// The run.
    pub run_id: Uuid,
    /// Whether the agent was running it (`false`: it ends as the agent finds it).
    pub cancelling: bool,
}
