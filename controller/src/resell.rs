//! The resell pipeline's shell (C2): takes a provider's request, stores it with its
//! pipeline as a row, and drives the pipeline one step at a time: the preliminary
//! criteria, a validation run on every host through its agent, the acceptance
//! criteria, the listings and the provider's notice.
//!
//! The decisions are `surplus_market` code (`resell::preliminary`, `resell::assess`,
//! `listings::offer`, the `pipeline::Pipeline` state machine); this file reads what
//! they need and writes what they return. Every step is one transaction that stores
//! the pipeline with what the step made (`ResellStore::advance_resell_request`), so a
//! controller killed at any point resumes from the last stored step: a step that was
//! stored is not asked for again, one that was not is done again, and the listings and
//! notices have keys that make a repeat write nothing. A validation run the controller
//! was killed during is failed at the next start ("the controller stopped during the
//! run") and ordered again.

use std::sync::Arc;
use std::time::Duration;

use surplus_market::listings::{Listing, offer};
use surplus_market::pipeline::{Action, Pipeline, Stage};
use surplus_market::quality::{HostResult, Retest, after_retest};
use surplus_market::resell::{
    Assessment, Evidence, FieldError, Requirements, ResellRequest, ResourceSet, Standing, assess,
    preliminary, set_cpus, validate,
};
use surplus_protocol::Inventory;
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::control::{CompatLevel, CompatReport, Isolation};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::App;
use crate::registry::RegistryEvent;
use crate::store::{Notice, ResellRow, ResellStep, RunStatus, StoreError, ValidationRun};
use crate::validation::{StartError, Validations};

pub use surplus_market::catalog::Categories;
pub use surplus_market::resell::Platforms;

/// How often open requests are looked at when nothing wakes the driver sooner.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// What a waiting request did: took a step, or waits (until its deadline, if any).
enum Waiting {
    Moved(Result<(), surplus_market::pipeline::Refusal>),
    Until(Option<UnixMillis>),
}

/// Why a request was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The document has problems; nothing was stored.
    #[error("{}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Resell requests: taking them and driving their pipelines.
#[derive(Debug, Clone)]
pub struct Resell {
    app: Arc<App>,
    validations: Validations,
    wake: Arc<tokio::sync::Notify>,
}

impl Resell {
    pub(crate) fn new(app: Arc<App>, validations: Validations) -> Self {
        Self {
            app,
            validations,
            wake: Arc::default(),
        }
    }

    /// The supported platforms in force: as stored, else [`Platforms::standard`].
    pub async fn platforms(&self) -> Result<Platforms, StoreError> {
        match self.app.store.setting("platforms").await? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("platforms: {e}"))),
            None => Ok(Platforms::standard()),
        }
    }

    /// The size categories in force: as stored, else [`Categories::standard`].
    pub async fn categories(&self) -> Result<Categories, StoreError> {
        categories(self.app.store.as_ref()).await
    }

    /// Takes `provider`'s request: every problem of the document, and every host that
    /// is not an agent enrolled for `provider`, is reported at once with its field,
    /// and then nothing is stored. A request taken is stored with its pipeline at its
    /// start and driven from there.
    pub async fn submit(
        &self,
        provider: &str,
        document: ResellRequest,
    ) -> Result<ResellRow, SubmitError> {
        let mut problems = validate(&document);
        // A host is offered once (the preliminary criteria check again, in order).
        let taken = self.taken(None).await?;
        for (i, set) in document.resource_sets.iter().enumerate() {
            for (j, host) in set.hosts.iter().enumerate() {
                let field = format!("resource_sets[{i}].hosts[{j}]");
                // Whose host it is comes first: what holds another provider's host
                // is not this provider's to learn.
                match self.app.store.agent(*host).await? {
                    None => problems.push(FieldError {
                        field,
                        message: format!("no agent {host} is enrolled"),
                    }),
                    Some(a) if a.revoked_at_ms.is_some() => problems.push(FieldError {
                        field,
                        message: format!("agent {host} is revoked"),
                    }),
                    Some(a) if crate::billing::provider_of(&a.labels) != provider => {
                        problems.push(FieldError {
                            field,
                            message: format!(
                                "agent {host} is not enrolled for provider {provider} (its provider label says otherwise)"
                            ),
                        })
                    }
                    Some(_) => {
                        if let Some(why) = taken.get(host) {
                            problems.push(FieldError {
                                field,
                                message: format!("agent {host} is offered already: {why}"),
                            });
                        }
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(SubmitError::Invalid(problems));
        }
        let now = self.app.clock.now_ms();
        let id = Uuid::now_v7();
        let hosts: Vec<(Uuid, usize)> = document
            .resource_sets
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.hosts.iter().map(move |h| (*h, i)))
            .collect();
        let row = ResellRow {
            id,
            provider: provider.to_owned(),
            pipeline: Pipeline::new(id, &hosts, now),
            document,
            version: 0,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.app.store.create_resell_request(&row).await?;
        tracing::info!(request = %id, %provider, hosts = hosts.len(), "resell request submitted");
        self.wake.notify_one();
        Ok(row)
    }

    /// Drives every open request until `cancel`: woken by a submission, by a
    /// validation run's end, by a request's deadline, and every few seconds.
    pub async fn drive(self, cancel: CancellationToken) {
        let mut events = self.app.registry.subscribe();
        loop {
            let next = match self.pass().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, "resell pipeline pass failed");
                    None
                }
            };
            let now = self.app.clock.now_ms();
            let idle = next
                .map(|at| Duration::from_millis(at.saturating_sub(now).max(0) as u64))
                .map_or(IDLE_POLL, |d| d.min(IDLE_POLL));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(idle) => {}
                // A run ended, or an agent came back that a request may wait for;
                // other events (heartbeats, progress) wake nothing.
                closed = relevant(&mut events) => if closed { return },
            }
        }
    }

    /// Advances every open request as far as it goes now; the earliest deadline of
    /// those left waiting.
    pub async fn pass(&self) -> Result<Option<UnixMillis>, StoreError> {
        let mut next: Option<UnixMillis> = None;
        for row in self.app.store.open_resell_requests().await? {
            let id = row.id;
            match self.advance(row).await {
                Ok(Some(at)) => next = Some(next.map_or(at, |n| n.min(at))),
                Ok(None) => {}
                Err(e) => tracing::error!(request = %id, error = %e, "resell request not advanced"),
            }
        }
        let now = self.app.clock.now_ms();
        for (listing, asked) in self.app.store.due_listings(now).await? {
            let id = listing.id.clone();
            if let Err(e) = self.retest(listing, asked, now).await {
                tracing::error!(listing = %id, error = %e, "listing re-test not advanced");
            }
        }
        Ok(next)
    }

    /// Asks for a re-test of a listing now; `false` when there is no such listing.
    pub async fn request_retest(&self, id: &str) -> Result<bool, StoreError> {
        let asked = self
            .app
            .store
            .request_retest(id, self.app.clock.now_ms())
            .await?;
        self.wake.notify_one();
        Ok(asked)
    }

    /// Moves a listing's re-test (C3): starts one that is due (a run on every host
    /// whose agent is connected; one that is not fails the `validation` rule), or
    /// ends one whose runs have all ended, judging them by the request's claims and
    /// storing the listing with its provider's advisory in one transaction.
    async fn retest(
        &self,
        mut listing: Listing,
        asked: Option<UnixMillis>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let policy = self.app.config.resell.retest_policy();
        let Some(retest) = listing.retest.clone() else {
            let mut runs = Vec::new();
            let mut results: Vec<HostResult> = Vec::new();
            let by = format!("retest:{}", listing.id);
            for host in &listing.hosts {
                if !self.app.link.is_connected(*host) {
                    results.push((*host, Err("the agent was not connected".into())));
                    continue;
                }
                match self
                    .validations
                    .start(*host, &self.app.config.resell.validation, &by)
                    .await
                {
                    Ok(run) => runs.push((*host, run.id)),
                    Err(StartError::Store(e)) => return Err(e),
                    Err(e) => results.push((*host, Err(e.to_string()))),
                }
            }
            if runs.is_empty() {
                return self
                    .finish_retest(&listing, &results, &policy, asked, now)
                    .await;
            }
            tracing::info!(listing = %listing.id, hosts = runs.len(), on_demand = asked.is_some(), "listing re-test started");
            listing.retest = Some(Retest {
                started_at_ms: now,
                runs,
                on_demand: asked.is_some(),
            });
            // Hosts that could not be run on are judged with the others at the end.
            listing.next_retest_at_ms = None;
            return self.app.store.put_listing(&listing, asked, &[], now).await;
        };
        let row = self.app.store.resell_request(listing.request).await?;
        let set = row
            .as_ref()
            .and_then(|r| r.document.resource_sets.get(listing.set));
        let mut results: Vec<HostResult> = listing
            .hosts
            .iter()
            .filter(|h| !retest.runs.iter().any(|(r, _)| r == *h))
            .map(|h| (*h, Err("the agent was not connected".to_owned())))
            .collect();
        // A re-test has the pipeline's validation timeout; a run lost to a restart or a
        // dropped session is ordered again within it.
        let deadline = retest
            .started_at_ms
            .saturating_add(self.app.config.resell.validation_timeout.as_millis() as i64);
        let (mut reordered, mut waiting) = (false, false);
        let mut runs = retest.runs.clone();
        for (host, run_id) in runs.iter_mut() {
            let Some(run) = self.app.store.validation_run(*run_id).await? else {
                results.push((*host, Err("the run was not recorded".into())));
                continue;
            };
            let result = match run.status {
                RunStatus::Running if now < deadline => {
                    waiting = true;
                    continue;
                }
                _ if now < deadline && crate::validation::lost(&run) => {
                    if !self.app.link.is_connected(*host) {
                        waiting = true;
                        continue;
                    }
                    let by = format!("retest:{}", listing.id);
                    match self
                        .validations
                        .start(*host, &self.app.config.resell.validation, &by)
                        .await
                    {
                        Ok(again) => {
                            *run_id = again.id;
                            reordered = true;
                            continue;
                        }
                        Err(StartError::Store(e)) => return Err(e),
                        Err(_) => {
                            waiting = true;
                            continue;
                        }
                    }
                }
                RunStatus::Running => Err("the run did not end before the deadline".to_owned()),
                RunStatus::Succeeded => match set {
                    Some(rs) => self.judge(rs, &run).await?,
                    None => Err(format!(
                        "the listing's resource set {} is gone",
                        listing.set
                    )),
                },
                RunStatus::Failed | RunStatus::Cancelled => Err(run
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("the validation run was {}", run.status.as_str()))),
            };
            results.push((*host, result));
        }
        if reordered {
            tracing::info!(listing = %listing.id, "lost re-test runs ordered again");
            listing.retest = Some(Retest { runs, ..retest });
            return self.app.store.put_listing(&listing, None, &[], now).await;
        }
        if waiting {
            return Ok(());
        }
        self.finish_retest(&listing, &results, &policy, asked, now)
            .await
    }

    async fn finish_retest(
        &self,
        listing: &Listing,
        results: &[HostResult],
        policy: &surplus_market::quality::RetestPolicy,
        asked: Option<UnixMillis>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let categories = self.categories().await?;
        let (after, advisory) = after_retest(listing, results, policy, &categories, now);
        let notices: Vec<Notice> = advisory
            .iter()
            .map(|a| Notice {
                key: format!("{}:{}:{now}", a.kind, a.listing),
                recipient: provider_recipient(&listing.provider),
                kind: a.kind.clone(),
                body: serde_json::json!({
                    "listing": a.listing,
                    "listed": after.listed,
                    "failed": a.failed.iter().map(|(host, c)| serde_json::json!({
                        "host": host, "rule": c.rule, "field": c.field,
                        "claimed": c.claimed, "measured": c.measured, "required": c.required,
                    })).collect::<Vec<_>>(),
                }),
            })
            .collect();
        let notices: Vec<Notice> = notices
            .iter()
            .flat_map(|n| to_hosts(n, &listing.hosts).into_iter().chain([n.clone()]))
            .collect();
        tracing::info!(listing = %listing.id, listed = after.listed, failed = after.failed_retest, advisory = ?advisory.as_ref().map(|a| &a.kind), "listing re-test ended");
        self.app
            .store
            .put_listing(&after, asked, &notices, now)
            .await
    }

    /// Takes one request through every step it can take now; its deadline if it is
    /// left waiting for one.
    async fn advance(&self, mut row: ResellRow) -> Result<Option<UnixMillis>, StoreError> {
        loop {
            let now = self.app.clock.now_ms();
            let mut step = ResellStep::default();
            let moved = match row.pipeline.poll() {
                Some(Action::CheckPreliminary) => {
                    let unmet = self.preliminary(&row, now).await?;
                    let timeout = self.app.config.resell.validation_timeout.as_millis() as i64;
                    Waiting::Moved(row.pipeline.handle_preliminary(now, &unmet, timeout))
                }
                Some(Action::OrderValidation { hosts }) => {
                    // Each connected host's run is a step of its own; a host whose
                    // agent is not connected waits for it (until the deadline).
                    let mut ordered = false;
                    for host in hosts {
                        if !self.app.link.is_connected(host) {
                            continue;
                        }
                        let by = format!("resell:{}", row.id);
                        let options = &self.app.config.resell.validation;
                        let moved = match self.validations.start(host, options, &by).await {
                            Ok(run) => row.pipeline.handle_run_ordered(now, host, run.id),
                            Err(StartError::Store(e)) => return Err(e),
                            // Gone between the check and the call: wait for it.
                            Err(StartError::Link(_)) => continue,
                            Err(e) => row.pipeline.handle_host_failed(now, host, &e.to_string()),
                        };
                        if !self
                            .apply(&mut row, moved, &ResellStep::default(), now)
                            .await?
                        {
                            return Ok(None);
                        }
                        ordered = true;
                    }
                    if ordered {
                        continue;
                    }
                    self.waiting(&mut row, now).await?
                }
                Some(Action::CreateListings { .. }) => {
                    step.listings = offer(&row.provider, &row.document, &row.pipeline, now, || {
                        surplus_protocol::control::new_id("lst-")
                    });
                    let interval = self.app.config.resell.retest_interval.as_millis() as i64;
                    for l in &mut step.listings {
                        l.next_retest_at_ms = Some(now.saturating_add(interval));
                    }
                    Waiting::Moved(row.pipeline.handle_listed(now))
                }
                Some(Action::Notify { outcome }) => {
                    let notice = self.outcome_notice(&row, outcome).await?;
                    let hosts: Vec<Uuid> = row.pipeline.hosts.iter().map(|h| h.host).collect();
                    step.notices.extend(to_hosts(&notice, &hosts));
                    step.notices.push(notice);
                    Waiting::Moved(row.pipeline.handle_notified(now))
                }
                None => self.waiting(&mut row, now).await?,
            };
            let moved = match moved {
                Waiting::Moved(m) => m,
                Waiting::Until(at) => return Ok(at),
            };
            if !self.apply(&mut row, moved, &step, now).await? {
                return Ok(None);
            }
        }
    }

    /// Stores a step the pipeline took (`moved`) with what it made; false when the
    /// request is not to be driven further now (the pipeline refused the step, which
    /// is a bug of this shell, or another writer moved the row first).
    async fn apply(
        &self,
        row: &mut ResellRow,
        moved: Result<(), surplus_market::pipeline::Refusal>,
        step: &ResellStep,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        if let Err(refusal) = moved {
            tracing::error!(request = %row.id, %refusal, "resell pipeline refused its own step");
            return Ok(false);
        }
        if !self
            .app
            .store
            .advance_resell_request(row, step, now)
            .await?
        {
            tracing::warn!(request = %row.id, "resell request moved elsewhere; reloading");
            return Ok(false);
        }
        row.version += 1;
        if let Some(last) = row.pipeline.steps.last() {
            tracing::info!(request = %row.id, stage = ?row.pipeline.stage, step = %last.what, "resell request moved");
        }
        Ok(true)
    }

    /// A request waiting for runs to end: the first ended run judged, else the
    /// deadline if it has come, else when to look again.
    async fn waiting(&self, row: &mut ResellRow, now: UnixMillis) -> Result<Waiting, StoreError> {
        Ok(
            match self
                .check_runs(&row.document, &mut row.pipeline, now)
                .await?
            {
                Some(result) => Waiting::Moved(result),
                None => match row.pipeline.next_deadline() {
                    Some(at) if now >= at => Waiting::Moved(row.pipeline.handle_timeout(now)),
                    waiting => Waiting::Until(waiting),
                },
            },
        )
    }

    /// The hosts held by a listing or by a request past its preliminary criteria and
    /// not rejected, other than `except`, with why.
    async fn taken(
        &self,
        except: Option<Uuid>,
    ) -> Result<std::collections::BTreeMap<Uuid, String>, StoreError> {
        let mut taken = std::collections::BTreeMap::new();
        for r in self.app.store.open_resell_requests().await? {
            if Some(r.id) == except
                || matches!(r.pipeline.stage, Stage::Preliminary | Stage::Rejected)
            {
                continue;
            }
            for h in r.pipeline.hosts {
                taken.insert(
                    h.host,
                    format!("resell request {} is being validated", r.id),
                );
            }
        }
        for l in self.app.store.listings().await? {
            if Some(l.request) == except {
                continue;
            }
            for h in l.hosts {
                taken.insert(h, format!("listing {} holds it", l.id));
            }
        }
        Ok(taken)
    }

    /// What the preliminary criteria of `row` are judged against, and the unmet ones.
    async fn preliminary(
        &self,
        row: &ResellRow,
        now: UnixMillis,
    ) -> Result<Vec<surplus_market::resell::Unmet>, StoreError> {
        let store = &self.app.store;
        let provider = store.provider(&row.provider).await?;
        let agreements = store.agreements(Some(&row.provider)).await?;
        // The agreement in force, else the newest (so that the reason names it).
        let agreement = surplus_market::resell::agreement_in_force(&agreements, now).or(agreements
            .iter()
            .max_by_key(|a| (a.created_at_ms, a.id.clone())));
        let platforms = self.platforms().await?;
        // The provider's hosts held elsewhere count against its limit: listed or
        // delisted (a re-test may relist), and in its other requests past their own
        // preliminary check (requests are driven one at a time, so of two submitted
        // together the second sees the first here).
        // Each held host with the CPU threads it was claimed with.
        let mut held: std::collections::BTreeMap<Uuid, u32> = Default::default();
        for l in store.listings().await? {
            if l.provider != row.provider || l.request == row.id {
                continue;
            }
            let claimed = store.resell_request(l.request).await?;
            let cpus = claimed
                .as_ref()
                .and_then(|r| r.document.resource_sets.get(l.set))
                .map_or(0, set_cpus);
            held.extend(l.hosts.iter().map(|h| (*h, cpus)));
        }
        for r in store.open_resell_requests().await? {
            if r.id != row.id
                && r.provider == row.provider
                && !matches!(r.pipeline.stage, Stage::Preliminary | Stage::Rejected)
            {
                for h in &r.pipeline.hosts {
                    let cpus = r.document.resource_sets.get(h.set).map_or(0, set_cpus);
                    held.insert(h.host, cpus);
                }
            }
        }
        let taken = self.taken(Some(row.id)).await?;
        Ok(preliminary(
            &row.document,
            &Standing {
                taken: &taken,
                agreement,
                provider: provider.as_ref(),
                platforms: &platforms,
                listed_hosts: u32::try_from(held.len()).unwrap_or(u32::MAX),
                held_cpus: held.values().fold(0, |a, c| a.saturating_add(*c)),
                now_ms: now,
            },
        ))
    }

    /// The first host whose validation run ended, judged (or failed, or ordered again
    /// when the run was lost to a restart); `None` when every run is still going.
    async fn check_runs(
        &self,
        document: &ResellRequest,
        pipeline: &mut Pipeline,
        now: UnixMillis,
    ) -> Result<Option<Result<(), surplus_market::pipeline::Refusal>>, StoreError> {
        if pipeline.stage != Stage::Validating {
            return Ok(None);
        }
        let waiting: Vec<(Uuid, usize, Uuid)> = pipeline
            .hosts
            .iter()
            .filter(|h| h.assessment.is_none() && h.failure.is_none())
            .filter_map(|h| h.run.map(|r| (h.host, h.set, r)))
            .collect();
        for (host, set, run_id) in waiting {
            let Some(run) = self.app.store.validation_run(run_id).await? else {
                return Ok(Some(pipeline.handle_run_lost(
                    now,
                    host,
                    run_id,
                    "the run was not recorded",
                )));
            };
            let result = match run.status {
                RunStatus::Running => continue,
                _ if crate::validation::lost(&run) => {
                    let why = run.error.as_deref().unwrap_or("lost");
                    pipeline.handle_run_lost(now, host, run_id, why)
                }
                RunStatus::Failed | RunStatus::Cancelled => {
                    let why = run.error.clone().unwrap_or_else(|| {
                        format!("the validation run was {}", run.status.as_str())
                    });
                    pipeline.handle_host_failed(now, host, &why)
                }
                RunStatus::Succeeded => {
                    let judged = match document.resource_sets.get(set) {
                        Some(rs) => self.judge(rs, &run).await?,
                        None => Err(format!("resource set {set} is not in the request")),
                    };
                    match judged {
                        Ok(assessment) => pipeline.handle_assessed(now, host, run_id, assessment),
                        Err(why) => pipeline.handle_host_failed(now, host, &why),
                    }
                }
            };
            return Ok(Some(result));
        }
        Ok(None)
    }

    /// Judges a host by its run's evidence, its inventory and its last compatibility
    /// report (a host that never reported one is judged with no operation passing).
    async fn judge(
        &self,
        resource_set: &ResourceSet,
        run: &ValidationRun,
    ) -> Result<Result<Assessment, String>, StoreError> {
        let agent = self.app.store.agent(run.agent_id).await?;
        let inventory: Option<Inventory> = agent
            .and_then(|a| a.inventory)
            .and_then(|v| serde_json::from_value(v).ok());
        let Some(inventory) = inventory else {
            return Ok(Err("the host has reported no inventory".into()));
        };
        fn parse<T: serde::de::DeserializeOwned>(
            v: &Option<serde_json::Value>,
            what: &str,
        ) -> Result<T, String> {
            let v = v
                .clone()
                .ok_or_else(|| format!("the run has no {what} report"))?;
            serde_json::from_value(v).map_err(|e| format!("the {what} report: {e}"))
        }
        let bench: surplus_protocol::bench::BenchReport = match parse(&run.bench, "benchmark") {
            Ok(b) => b,
            Err(why) => return Ok(Err(why)),
        };
        let security: surplus_protocol::security::SecurityReport =
            match parse(&run.security, "security") {
                Ok(s) => s,
                Err(why) => return Ok(Err(why)),
            };
        let compat = match self.app.store.compat_report(run.agent_id).await? {
            Some((report, _)) => report,
            None => CompatReport {
                driver: "none".into(),
                level: CompatLevel::Incompatible,
                checks: Vec::new(),
                isolation: Isolation::default(),
                ran_at_ms: 0,
            },
        };
        let requirements = Requirements {
            tolerances: self.app.config.resell.tolerances,
            min_hardening: self.app.config.resell.min_hardening,
            categories: self.categories().await?,
        };
        Ok(Ok(assess(
            resource_set,
            &Evidence {
                inventory: &inventory,
                bench: &bench,
                security: &security,
                compat: &compat,
            },
            &requirements,
        )))
    }

    /// The provider's notice of a request's outcome, keyed by the request and outcome.
    async fn outcome_notice(&self, row: &ResellRow, outcome: Stage) -> Result<Notice, StoreError> {
        let listings: Vec<String> = self
            .app
            .store
            .listings()
            .await?
            .into_iter()
            .filter(|l| l.request == row.id)
            .map(|l| l.id)
            .collect();
        let kind = match outcome {
            Stage::Accepted => "resell.accepted",
            _ => "resell.rejected",
        };
        Ok(Notice {
            key: format!("{kind}:{}", row.id),
            recipient: provider_recipient(&row.provider),
            kind: kind.into(),
            body: serde_json::json!({
                "request": row.id,
                "outcome": outcome,
                "reasons": row.pipeline.reasons,
                "listings": listings,
            }),
        })
    }
}

/// A provider's notice as its hosts' agents get it (over their sessions), one each.
fn to_hosts(notice: &Notice, hosts: &[Uuid]) -> Vec<Notice> {
    hosts
        .iter()
        .map(|h| Notice {
            key: format!("{}:agent:{h}", notice.key),
            recipient: agent_recipient(*h),
            ..notice.clone()
        })
        .collect()
}

/// The outbox recipient of the notices an agent gets over its session.
pub fn agent_recipient(agent: Uuid) -> String {
    format!("agent:{agent}")
}

/// Waits for an event that may move a request or a re-test; `true` when the registry
/// is gone (the controller stops).
async fn relevant(events: &mut tokio::sync::broadcast::Receiver<RegistryEvent>) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(RegistryEvent::ValidationFinished { .. } | RegistryEvent::Online(_))
            | Err(RecvError::Lagged(_)) => return false,
            Ok(_) => {}
            Err(RecvError::Closed) => return true,
        }
    }
}

/// The size categories in force: the admins' setting, else the standard ones.
pub async fn categories(store: &dyn crate::store::Store) -> Result<Categories, StoreError> {
    match store.setting("categories").await? {
        Some(text) => {
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("categories: {e}")))
        }
        None => Ok(Categories::standard()),
    }
}

/// The outbox recipient of a provider's notices.
pub fn provider_recipient(account: &str) -> String {
    format!("provider:{account}")
}
