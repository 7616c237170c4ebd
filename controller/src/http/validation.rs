//! Validation runs: ordering one on an agent, following it, cancelling it.

use surplus_api::validation::{Cancelling, RunHistory, RunView, ValidationOptions};

use super::*;

pub(super) fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        route(
            "POST",
            "/v1/agents/{id}/validation",
            Token,
            order_validation,
        ),
        route(
            "GET",
            "/v1/agents/{id}/validation",
            Token,
            agent_validations,
        ),
        route("GET", "/v1/validations/{run}", Token, show_validation),
        route(
            "POST",
            "/v1/validations/{run}/cancel",
            Token,
            cancel_validation,
        ),
    ]
}

/// The validation run named by a path segment: 400 when it is no UUID, 404 when unknown.
async fn load_run(ctl: &Controller, text: &str) -> Result<crate::store::ValidationRun, ApiError> {
    let id = Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a run id (a UUID)")))?;
    ctl.app
        .store
        .validation_run(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("validation run {id} not found")))
}

fn run_view(ctl: &Controller, run: crate::store::ValidationRun) -> RunView {
    let progress = ctl.validation.progress(run.id).flatten();
    RunView { run, progress }
}

#[utoipa::path(post, path = "/v1/agents/{id}/validation", tag = "validation", params(("id" = Uuid, Path, description = "The agent")), request_body(content = ValidationOptions, description = "Which suites and how long; `{}` orders the defaults"), responses((status = 202, description = "The run, ordered", body = RunView)))]
pub(crate) async fn order_validation(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<ValidationOptions>, JsonRejection>,
) -> Result<(StatusCode, Json<RunView>), ApiError> {
    caller.require(Role::Admin)?;
    let agent = load_agent(&ctl, &id).await?;
    let id = agent.id;
    let Json(options) = body?;
    match ctl.validation.start(id, &options, &caller.0.account).await {
        Ok(run) => Ok((StatusCode::ACCEPTED, Json(run_view(&ctl, run)))),
        Err(crate::validation::StartError::Invalid(why)) => Err(ApiError::bad_request(why)),
        Err(crate::validation::StartError::Link(e)) => Err(e.into()),
        Err(crate::validation::StartError::Store(e)) => Err(e.into()),
    }
}

#[utoipa::path(get, path = "/v1/agents/{id}/validation", tag = "validation", params(("id" = Uuid, Path, description = "The agent")), responses((status = 200, description = "The agent's runs, newest first", body = RunHistory)))]
pub(crate) async fn agent_validations(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<RunHistory> {
    let agent = load_agent(&ctl, &id).await?;
    billing::require_host_owner(&caller, &agent)?;
    let id = agent.id;
    let runs: Vec<RunView> = ctl
        .app
        .store
        .validation_runs(id, 100)
        .await?
        .into_iter()
        .map(|r| run_view(&ctl, r))
        .collect();
    let latest = runs
        .iter()
        .find(|r| r.run.status != crate::store::RunStatus::Running)
        .cloned();
    Ok(Json(RunHistory {
        latest,
        history: runs,
    }))
}

#[utoipa::path(get, path = "/v1/validations/{run}", tag = "validation", params(("run" = Uuid, Path, description = "The validation run")), responses((status = 200, description = "The run with its progress and results", body = RunView)))]
pub(crate) async fn show_validation(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(run): Path<String>,
) -> ApiResult<RunView> {
    let run = load_run(&ctl, &run).await?;
    if caller.0.role != Role::Admin {
        let agent = load_agent(&ctl, &run.agent_id.to_string()).await?;
        billing::require_host_owner(&caller, &agent)?;
    }
    Ok(Json(run_view(&ctl, run)))
}

#[utoipa::path(post, path = "/v1/validations/{run}/cancel", tag = "validation", params(("run" = Uuid, Path, description = "The validation run")), responses((status = 202, description = "The agent was asked to stop the run", body = Cancelling)))]
async fn cancel_validation(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(run): Path<String>,
) -> Result<(StatusCode, Json<Cancelling>), ApiError> {
    caller.require(Role::Admin)?;
    let run = load_run(&ctl, &run).await?;
    let run_id = run.id;
    if run.status != crate::store::RunStatus::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_running",
            format!(
                "validation run {run_id} already ended ({})",
                run.status.as_str()
            ),
        ));
    }
    let was_running = ctl.validation.cancel(&run).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Cancelling {
            run_id,
            cancelling: was_running,
        }),
    ))
}
