//! Validation runs ordered on agents (A3, A4 through C2/C3): the controller opens a
//! stream to the agent, records progress as it arrives, and stores the final report as
//! history. A run ends exactly once: succeeded, cancelled, or failed with the reason
//! (agent lost mid-run, no answer within its budget, controller stopped).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use surplus_api::validation::ValidationOptions;
use surplus_protocol::messages::*;
use uuid::Uuid;

use crate::app::App;
use crate::link::LinkError;
use crate::registry::RegistryEvent;
use crate::store::{RunStatus, StoreError, ValidationRun};

/// The error of a run whose agent's session ended during it (the agent or the
/// controller went away): the host was not judged, the run may be ordered again.
pub const AGENT_LOST: &str = "the agent disconnected during the run";

/// The error `close_dangling` gives the runs a stopped controller left running.
pub const CONTROLLER_STOPPED: &str = "the controller stopped during the run";

/// A run that ended without a verdict on its host, through no fault of the host's
/// (the controller stopped, the session was lost): worth ordering again.
pub fn lost(run: &ValidationRun) -> bool {
    run.status == RunStatus::Failed
        && matches!(run.error.as_deref(), Some(AGENT_LOST | CONTROLLER_STOPPED))
}

/// Extra time beyond a run's budget before the controller gives up on it.
const GRACE: Duration = Duration::from_secs(120);

/// Why a run could not be ordered.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The options do not make sense.
    #[error("{0}")]
    Invalid(String),
    /// The agent is not connected.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The wire request for run `run_id` as `options` ask for it, and its time budget.
pub fn request(
    options: &ValidationOptions,
    run_id: Uuid,
) -> Result<(ValidationRequest, Duration), StartError> {
    if !options.bench && !options.security {
        return Err(StartError::Invalid(
            "nothing to run: ask for bench, security or both".into(),
        ));
    }
    let budget = humantime::parse_duration(&options.budget)
        .map_err(|e| StartError::Invalid(format!("budget {:?}: {e}", options.budget)))?;
    if budget.is_zero() || budget > Duration::from_secs(3600) {
        return Err(StartError::Invalid(
            "budget must be more than zero and at most an hour".into(),
        ));
    }
    if !(1..=20).contains(&options.repetitions) {
        return Err(StartError::Invalid(
            "repetitions must be between 1 and 20".into(),
        ));
    }
    let bench = options.bench.then_some(BenchRequest {
        budget_ms: budget.as_millis() as u64,
        repetitions: options.repetitions,
        quick: options.quick,
        network_bytes: options.network_bytes,
    });
    Ok((
        ValidationRequest {
            run_id,
            bench,
            security: options.security,
        },
        budget,
    ))
}

/// Validation runs: ordering them, following their progress, cancelling them.
#[derive(Debug, Clone)]
pub struct Validations {
    app: Arc<App>,
    /// Latest progress of the runs in flight.
    progress: Arc<std::sync::Mutex<HashMap<Uuid, Option<ValidationProgress>>>>,
}

impl Validations {
    pub(crate) fn new(app: Arc<App>) -> Self {
        Self {
            app,
            progress: Arc::default(),
        }
    }

    /// Orders a validation run on a connected agent; the run proceeds in the background.
    pub async fn start(
        &self,
        agent_id: Uuid,
        options: &ValidationOptions,
        requested_by: &str,
    ) -> Result<ValidationRun, StartError> {
        let run_id = Uuid::now_v7();
        let (request, budget) = request(options, run_id)?;
        if !self.app.link.is_connected(agent_id) {
            return Err(self.app.link.offline(agent_id).await.into());
        }
        let run = ValidationRun {
            id: run_id,
            agent_id,
            requested_by: requested_by.to_owned(),
            requested_at_ms: self.app.clock.now_ms(),
            request: serde_json::to_value(options).expect("options serialize"),
            status: RunStatus::Running,
            finished_at_ms: None,
            agent_version: None,
            bench: None,
            security: None,
            error: None,
        };
        self.app.store.create_validation_run(&run).await?;
        self.progress
            .lock()
            .expect("progress lock")
            .insert(run_id, None);
        tracing::info!(%run_id, %agent_id, bench = options.bench, security = options.security, "validation run ordered");
        let ctl = self.clone();
        let stored = run.clone();
        self.app
            .tasks
            .spawn(async move { ctl.drive(stored, request, budget).await });
        Ok(run)
    }

    async fn drive(&self, mut run: ValidationRun, request: ValidationRequest, budget: Duration) {
        let run_id = run.id;
        let answer = self
            .app
            .link
            .call_with_progress(
                run.agent_id,
                &Message::RunValidation(request),
                budget + GRACE,
                |m| match m {
                    Message::ValidationProgress(p) => {
                        self.progress
                            .lock()
                            .expect("progress lock")
                            .insert(run_id, Some(p.clone()));
                        self.app
                            .registry
                            .publish(RegistryEvent::ValidationProgress(run_id));
                        true
                    }
                    _ => false,
                },
            )
            .await;
        run.finished_at_ms = Some(self.app.clock.now_ms());
        match answer {
            Ok(Message::ValidationResult(report)) => {
                run.status = if report.cancelled {
                    RunStatus::Cancelled
                } else {
                    RunStatus::Succeeded
                };
                run.agent_version = Some(report.agent_version);
                run.bench = report
                    .bench
                    .map(|b| serde_json::to_value(b).expect("report serializes"));
                run.security = report
                    .security
                    .map(|s| serde_json::to_value(s).expect("report serializes"));
            }
            Ok(other) => {
                run.status = RunStatus::Failed;
                run.error =
                    Some(LinkError::unexpected(run.agent_id, "a validation", &other).to_string());
            }
            Err(LinkError::Offline { .. }) => {
                run.status = RunStatus::Failed;
                run.error = Some(AGENT_LOST.into());
            }
            Err(e) => {
                run.status = RunStatus::Failed;
                run.error = Some(e.to_string());
            }
        }
        match self.app.store.finish_validation_run(&run).await {
            Ok(true) => {
                tracing::info!(run_id = %run.id, status = run.status.as_str(), error = ?run.error, "validation run ended")
            }
            Ok(false) => tracing::warn!(run_id = %run.id, "validation run had already ended"),
            Err(e) => tracing::error!(run_id = %run.id, error = %e, "validation result not stored"),
        }
        self.progress.lock().expect("progress lock").remove(&run.id);
        self.app
            .registry
            .publish(RegistryEvent::ValidationFinished {
                run_id: run.id,
                status: run.status,
            });
    }

    /// The latest progress of a run in flight (`None` when not running here).
    pub fn progress(&self, run_id: Uuid) -> Option<Option<ValidationProgress>> {
        self.progress
            .lock()
            .expect("progress lock")
            .get(&run_id)
            .cloned()
    }

    /// Asks the agent to stop a run; `Ok(true)` when the agent was running it.
    pub async fn cancel(&self, run: &ValidationRun) -> Result<bool, LinkError> {
        let cancel = Message::CancelValidation(CancelValidation { run_id: run.id });
        match self
            .app
            .link
            .call(run.agent_id, &cancel, self.app.config.request_timeout)
            .await?
        {
            Message::CancelAck(ack) => Ok(ack.was_running),
            other => Err(LinkError::unexpected(
                run.agent_id,
                "a cancellation",
                &other,
            )),
        }
    }
}
