//! The controller's side of the primary control interface: parsing `POST /v1/control`
//! bodies, deciding who may do what, routing each command over QUIC to the agent that
//! hosts the instance or volume, and keeping the last answer so that descriptions
//! survive an offline agent and a restarted agent is reconciled.
//!
//! [`parse_request`] and [`authorise`] are pure; [`Control::handle`] is the thin
//! I/O layer around them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use surplus_api::control::{ControlResponse, InstanceView, VolumeView};
use surplus_protocol::Message;
use surplus_protocol::control::*;
use uuid::Uuid;

use crate::app::App;
use crate::link::LinkError;
use crate::store::{Claim, InstanceRow, Principal, Role, StoreError, VolumeRow};

/// A request of the primary control interface, as the API receives it.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlRequest {
    /// RunInstances.
    Run {
        /// Where to run it; optional when the volumes or a single agent decide.
        agent_id: Option<Uuid>,
        /// Idempotency token.
        client_token: Option<String>,
        /// What to run.
        spec: RunSpec,
    },
    /// Start, Stop, Reboot, TerminateInstances.
    Lifecycle {
        /// Which.
        op: Lifecycle,
        /// Instances.
        ids: Vec<String>,
    },
    /// DescribeInstances.
    Describe(Filters),
    /// DescribeInstanceStatus.
    Status {
        /// Instances (empty: all the caller's).
        ids: Vec<String>,
    },
    /// DescribeInstanceAttribute.
    Attribute {
        /// Instance.
        instance_id: String,
        /// Attribute.
        attribute: AttributeName,
    },
    /// ModifyInstanceAttribute.
    Modify {
        /// Instance.
        instance_id: String,
        /// The limits to change (the others stay).
        limits: Option<LimitsChange>,
        /// New labels.
        labels: Option<BTreeMap<String, String>>,
    },
    /// CreateVolume.
    CreateVolume {
        /// Where.
        agent_id: Option<Uuid>,
        /// Name.
        name: Option<String>,
        /// Size.
        size_bytes: u64,
    },
    /// DeleteVolume.
    DeleteVolume {
        /// Volume.
        volume_id: String,
    },
    /// DescribeVolumes.
    DescribeVolumes {
        /// Volumes (empty: all the caller's).
        ids: Vec<String>,
    },
    /// CreateSnapshot.
    CreateSnapshot {
        /// Volume.
        volume_id: String,
    },
    /// The end of an instance's output (`GET /v1/instances/{id}/logs`).
    Logs {
        /// Instance.
        instance_id: String,
        /// Most bytes of each stream.
        max_bytes: u32,
    },
}

/// Bytes of each stream `GET /v1/instances/{id}/logs` returns unless asked otherwise.
pub const DEFAULT_LOG_BYTES: u32 = 64 << 10;

/// Locks by instance id, made on first use and dropped when no one holds them.
#[derive(Debug, Default)]
pub struct Locks(std::sync::Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>);

impl Locks {
    /// Waits for the lock of `id`.
    pub async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().expect("locks poisoned");
            map.retain(|_, weak| weak.strong_count() > 0);
            match map.get(id).and_then(std::sync::Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = std::sync::Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(id.to_owned(), std::sync::Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

/// Every action `POST /v1/control` accepts.
pub const ACTIONS: &[&str] = &[
    "RunInstances",
    "StartInstances",
    "StopInstances",
    "RebootInstances",
    "TerminateInstances",
    "DescribeInstances",
    "DescribeInstanceStatus",
    "DescribeInstanceAttribute",
    "ModifyInstanceAttribute",
    "CreateVolume",
    "DeleteVolume",
    "DescribeVolumes",
    "CreateSnapshot",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdsBody {
    #[serde(alias = "instance_ids")]
    ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct OptionalIdsBody {
    #[serde(alias = "instance_ids", alias = "volume_ids")]
    ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttributeBody {
    instance_id: String,
    attribute: AttributeName,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModifyBody {
    instance_id: String,
    #[serde(default)]
    limits: Option<LimitsChange>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVolumeBody {
    #[serde(default)]
    agent_id: Option<Uuid>,
    #[serde(default)]
    name: Option<String>,
    size_bytes: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeBody {
    volume_id: String,
}

fn typed<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde names unknown and missing fields in its message; keep it whole.
        let field = if path == "." {
            inner
                .split('`')
                .nth(1)
                .map_or_else(|| "body".to_owned(), str::to_owned)
        } else {
            path
        };
        Invalid::new(field, inner)
    })
}

fn check_ids(field: &str, prefix: &str, ids: &[String]) -> Result<(), Invalid> {
    for (n, id) in ids.iter().enumerate() {
        validate_id(&format!("{field}[{n}]"), prefix, id)?;
    }
    Ok(())
}

/// Parses a `POST /v1/control` body: `{ "action": ..., ...fields }`. Unknown actions,
/// unknown fields and bad values are refused naming the field.
pub fn parse_request(body: Value) -> Result<ControlRequest, Invalid> {
    let Value::Object(mut map) = body else {
        return Err(Invalid::new("body", "must be a JSON object"));
    };
    let action = match map.remove("action") {
        Some(Value::String(a)) => a,
        Some(_) => return Err(Invalid::new("action", "must be a string")),
        None => {
            return Err(Invalid::new(
                "action",
                format!("missing; one of {}", ACTIONS.join(", ")),
            ));
        }
    };
    let lifecycle =
        |op: Lifecycle, map: serde_json::Map<String, Value>| -> Result<ControlRequest, Invalid> {
            let IdsBody { ids } = typed(Value::Object(map))?;
            if ids.is_empty() {
                return Err(Invalid::new("ids", "name at least one instance"));
            }
            check_ids("ids", INSTANCE_PREFIX, &ids)?;
            Ok(ControlRequest::Lifecycle { op, ids })
        };
    let request = match action.as_str() {
        "RunInstances" => {
            let agent_id = match map.remove("agent_id") {
                None | Some(Value::Null) => None,
                Some(v) => Some(typed::<Uuid>(v).map_err(|e| Invalid::new("agent_id", e.reason))?),
            };
            let client_token = match map.remove("client_token") {
                None | Some(Value::Null) => None,
                Some(Value::String(t))
                    if !t.is_empty() && t.len() <= 64 && !t.chars().any(char::is_control) =>
                {
                    Some(t)
                }
                Some(_) => {
                    return Err(Invalid::new(
                        "client_token",
                        "must be 1-64 printable characters",
                    ));
                }
            };
            let spec: RunSpec = typed(Value::Object(map))?;
            spec.validate()?;
            ControlRequest::Run {
                agent_id,
                client_token,
                spec,
            }
        }
        "StartInstances" => lifecycle(Lifecycle::Start, map)?,
        "StopInstances" => lifecycle(Lifecycle::Stop, map)?,
        "RebootInstances" => lifecycle(Lifecycle::Reboot, map)?,
        "TerminateInstances" => lifecycle(Lifecycle::Terminate, map)?,
        "DescribeInstances" => {
            let filters: Filters = typed(Value::Object(map))?;
            check_ids("ids", INSTANCE_PREFIX, &filters.ids)?;
            ControlRequest::Describe(filters)
        }
        "DescribeInstanceStatus" => {
            let OptionalIdsBody { ids } = typed(Value::Object(map))?;
            check_ids("ids", INSTANCE_PREFIX, &ids)?;
            ControlRequest::Status { ids }
        }
        "DescribeInstanceAttribute" => {
            let b: AttributeBody = typed(Value::Object(map))?;
            validate_id("instance_id", INSTANCE_PREFIX, &b.instance_id)?;
            ControlRequest::Attribute {
                instance_id: b.instance_id,
                attribute: b.attribute,
            }
        }
        "ModifyInstanceAttribute" => {
            let b: ModifyBody = typed(Value::Object(map))?;
            validate_id("instance_id", INSTANCE_PREFIX, &b.instance_id)?;
            if b.limits.is_none_or(|l| l.is_empty()) && b.labels.is_none() {
                return Err(Invalid::new("limits", "give limits, labels or both"));
            }
            if let Some(l) = &b.limits {
                // Each value given is checked alone; the merged limits again below.
                l.apply(Limits::default()).validate("limits")?;
            }
            for (k, v) in b.labels.iter().flatten() {
                validate_label(k, v)?;
            }
            ControlRequest::Modify {
                instance_id: b.instance_id,
                limits: b.limits,
                labels: b.labels,
            }
        }
        "CreateVolume" => {
            let b: CreateVolumeBody = typed(Value::Object(map))?;
            if let Some(n) = &b.name {
                validate_name("name", n)?;
            }
            if b.size_bytes == 0 {
                return Err(Invalid::new("size_bytes", "must be more than zero"));
            }
            ControlRequest::CreateVolume {
                agent_id: b.agent_id,
                name: b.name,
                size_bytes: b.size_bytes,
            }
        }
        "DeleteVolume" => {
            let b: VolumeBody = typed(Value::Object(map))?;
            validate_id("volume_id", VOLUME_PREFIX, &b.volume_id)?;
            ControlRequest::DeleteVolume {
                volume_id: b.volume_id,
            }
        }
        "DescribeVolumes" => {
            let OptionalIdsBody { ids } = typed(Value::Object(map))?;
            check_ids("ids", VOLUME_PREFIX, &ids)?;
            ControlRequest::DescribeVolumes { ids }
        }
        "CreateSnapshot" => {
            let b: VolumeBody = typed(Value::Object(map))?;
            validate_id("volume_id", VOLUME_PREFIX, &b.volume_id)?;
            ControlRequest::CreateSnapshot {
                volume_id: b.volume_id,
            }
        }
        other => {
            return Err(Invalid::new(
                "action",
                format!("unknown action {other:?}; one of {}", ACTIONS.join(", ")),
            ));
        }
    };
    Ok(request)
}

/// May `caller` act on something `owner` owns? Admins may act on everything; others
/// on what their own principal made: the same role *and* account, as in the ledger,
/// where `client:alice` and `provider:alice` are different accounts. On a host the
/// market sells, the holder of its reservation is checked besides
/// (`Control::market_gate`).
pub fn authorise(caller: &Principal, owner: &Principal) -> bool {
    caller.role == Role::Admin || caller == owner
}

/// May `caller` create instances and volumes at all?
pub fn may_create(caller: &Principal) -> bool {
    matches!(caller.role, Role::Admin | Role::Client)
}

/// Digest of what a RunInstances asks for, to recognise a reused client token.
pub fn request_hash(agent_id: Uuid, spec: &RunSpec) -> String {
    let text = serde_json::to_string(&(agent_id, spec)).expect("specs serialize");
    surplus_certs::hex(&surplus_certs::sha256(text.as_bytes()))
}

/// Why a control request failed; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A value is not acceptable (400).
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// No such instance or volume (404).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not (403).
    #[error("{0}")]
    Forbidden(String),
    /// Conflicts with the current state or an earlier request (409).
    #[error("{0}")]
    Conflict(String),
    /// A prepaid client cannot cover what running the instance needs (402).
    #[error(
        "{account} holds {balance} {currency}; running here needs {needed} (the upfront fee and the prepaid minimum)"
    )]
    InsufficientFunds {
        /// The ledger account.
        account: String,
        /// The currency of the host's rate card.
        currency: String,
        /// What the account holds.
        balance: i64,
        /// What it needs.
        needed: i64,
    },
    /// The agent answered the command with a failure.
    #[error("agent {agent_id}: {failure}")]
    Agent {
        /// The agent.
        agent_id: Uuid,
        /// What it said.
        failure: ControlFailure,
    },
    /// The agent could not be asked, or did not answer (503, 504, 502).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Storage failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The primary control interface: instances and volumes on the agents that host them.
#[derive(Debug, Clone)]
pub struct Control {
    app: Arc<App>,
    /// One lock per instance being modified: the agent's change and the record of the
    /// limits in force are made in the same order (and one per reserved host while a
    /// run is checked against its size and claimed).
    instance_locks: Arc<Locks>,
    /// Who may control a host the market sells.
    market: crate::market::Market,
}

impl Control {
    pub(crate) fn new(app: Arc<App>) -> Self {
        Self {
            market: crate::market::Market::new(app.clone()),
            app,
            instance_locks: Arc::default(),
        }
    }

    /// The market's word on `caller` controlling `host` (see
    /// [`crate::market::Market::gate`]): the caller's reservation of it, none for a
    /// host the market does not sell, 403 otherwise. Admins may act on instances and
    /// volumes that exist (`run` false) wherever they are; nobody but the holder runs
    /// anything on a reserved host. Stopping, terminating and deleting a volume, which
    /// only end work, are their owner's anywhere and do not ask.
    async fn market_gate(
        &self,
        caller: &Principal,
        host: Uuid,
        run: bool,
    ) -> Result<Option<crate::market::Held>, ControlError> {
        if !run && caller.role == Role::Admin {
            return Ok(None);
        }
        self.market.gate(caller, host).await.map_err(|e| match e {
            crate::market::MarketError::Store(e) => ControlError::Store(e),
            crate::market::MarketError::Forbidden(m) => ControlError::Forbidden(m),
            other => ControlError::Conflict(other.to_string()),
        })
    }

    /// Checks that `limits` fit the size of reservation `r` beside the holder's other
    /// instances on its host (all but `except`): an instance without a CPU or memory
    /// limit counts as the whole size, so it fits only alone.
    async fn fits_reservation(
        &self,
        r: &crate::market::Reservation,
        limits: &surplus_protocol::control::Limits,
        except: Option<&str>,
    ) -> Result<(), ControlError> {
        let Some((millicpus, memory)) = self.market.size_of(&r.listing).await? else {
            return Ok(());
        };
        let take = |l: &surplus_protocol::control::Limits| {
            (
                u64::from(l.millicpus.unwrap_or(millicpus)),
                l.memory_bytes.unwrap_or(memory),
            )
        };
        let (mut cpu, mut mem) = take(limits);
        for row in self.app.store.agent_instances(r.host).await? {
            if row.account == r.holder
                && row.owner_role == Role::Client
                && row.record.state != InstanceState::Terminated
                && Some(row.record.id.as_str()) != except
            {
                let (c, m) = take(&row.record.spec.limits);
                cpu = cpu.saturating_add(c);
                mem = mem.saturating_add(m);
            }
        }
        if cpu > u64::from(millicpus) || mem > memory {
            return Err(Invalid::new(
                "limits",
                format!(
                    "reservation {} is for {millicpus} millicpus and {memory} bytes of memory; with this instance the holder's instances on host {} would take {cpu} millicpus and {mem} bytes (an instance without a limit takes the whole size)",
                    r.id, r.host
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Sends one command to an agent and waits for the translated answer.
    pub async fn agent_command(
        &self,
        agent_id: Uuid,
        command: Command,
    ) -> Result<ControlReply, ControlError> {
        let action = command.action();
        let started = std::time::Instant::now();
        let answer = self
            .app
            .link
            .call(
                agent_id,
                &Message::Control(command),
                self.app.config.control_timeout,
            )
            .await;
        self.app.metrics.observe_control(action, started.elapsed());
        match answer? {
            Message::ControlResult(Ok(reply)) => Ok(reply),
            Message::ControlResult(Err(failure)) => Err(ControlError::Agent { agent_id, failure }),
            other => Err(LinkError::unexpected(agent_id, "a control command", &other).into()),
        }
    }

    async fn owned_instance(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<InstanceRow, ControlError> {
        let row = self.app.store.instance(id).await?;
        owned(caller, "instance", id, row, InstanceRow::owner)
    }

    async fn owned_volume(&self, caller: &Principal, id: &str) -> Result<VolumeRow, ControlError> {
        let row = self.app.store.volume(id).await?;
        owned(caller, "volume", id, row, VolumeRow::owner)
    }

    /// Stops and terminates every instance of a host the market sells whose owner does
    /// not hold the host now while another client does, or whose owner's reservation
    /// of it ended (of `host` only, or of every host): one instance per command, hosts
    /// side by side, each under its instance lock. An instance its agent no longer
    /// knows is recorded as terminated; a host that does not answer is tried again by
    /// the next call (the market's tick makes one every `market.tick`).
    pub async fn stop_unreserved(&self, host: Option<Uuid>) {
        let rows = match self
            .app
            .store
            .unreserved_instances(self.app.clock.now_ms())
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "reading the instances of ended reservations");
                return;
            }
        };
        let mut by_host: std::collections::BTreeMap<Uuid, Vec<InstanceRow>> = Default::default();
        for r in rows
            .into_iter()
            .filter(|r| host.is_none_or(|h| h == r.agent_id))
        {
            by_host.entry(r.agent_id).or_default().push(r);
        }
        let mut hosts = tokio::task::JoinSet::new();
        for (host, rows) in by_host {
            let control = self.clone();
            hosts.spawn(async move {
                for row in rows {
                    if let Err(e) = control.end_unreserved(&row).await {
                        tracing::warn!(%host, instance = %row.record.id, error = %e, "stopping an instance of an ended reservation; tried again next tick");
                        // The host is away: its other instances wait for the next tick.
                        if matches!(e, ControlError::Link(_)) {
                            return;
                        }
                    }
                }
            });
        }
        while hosts.join_next().await.is_some() {}
    }

    /// Terminates one instance of an ended reservation, under its lock.
    async fn end_unreserved(&self, row: &InstanceRow) -> Result<(), ControlError> {
        let id = &row.record.id;
        let _guard = self.instance_locks.lock(id).await;
        let command = Command::Lifecycle {
            op: Lifecycle::Terminate,
            ids: vec![id.clone()],
        };
        let state = match self.agent_command(row.agent_id, command).await {
            Ok(ControlReply::StateChanges(changes)) => changes
                .into_iter()
                .find(|c| &c.instance_id == id)
                .map_or(InstanceState::Terminated, |c| c.current),
            Ok(other) => return Err(unexpected(row.agent_id, &other)),
            // Gone from its host: nothing runs there any more.
            Err(ControlError::Agent { failure, .. })
                if failure.kind == surplus_protocol::control::FailureKind::NotFound =>
            {
                InstanceState::Terminated
            }
            Err(e) => return Err(e),
        };
        let now = self.app.clock.now_ms();
        let mut record = row.record.clone();
        record.state = state;
        record.state_reason = Some("the reservation of its host ended".into());
        record.state_changed_at_ms = now;
        self.app.store.update_instances(&[record], now).await?;
        tracing::info!(instance = %id, host = %row.agent_id, "instance of an ended reservation terminated");
        Ok(())
    }

    /// The host asked for, else the one host `caller` holds a reservation of; with
    /// several held, the caller must name one.
    async fn held_or(
        &self,
        caller: &Principal,
        asked: Option<Uuid>,
    ) -> Result<Option<Uuid>, ControlError> {
        if asked.is_some() {
            return Ok(asked);
        }
        match self.market.held_hosts(caller).await?.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            many => Err(Invalid::new(
                "agent_id",
                format!(
                    "required: you hold {} reserved hosts ({})",
                    many.len(),
                    many.iter()
                        .map(Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .into()),
        }
    }

    /// The agent a new instance or volume goes to.
    async fn placement(&self, asked: Option<Uuid>) -> Result<Uuid, ControlError> {
        if let Some(id) = asked {
            let agent =
                self.app.store.agent(id).await?.ok_or_else(|| {
                    Invalid::new("agent_id", format!("agent {id} is not enrolled"))
                })?;
            if agent.status == crate::store::AgentStatus::Revoked {
                return Err(Invalid::new("agent_id", format!("agent {id} is revoked")).into());
            }
            return Ok(id);
        }
        let connected = self.app.registry.connected_agents();
        match connected.as_slice() {
            [only] => Ok(*only),
            [] => Err(Invalid::new("agent_id", "no agent is connected to run it").into()),
            many => Err(Invalid::new(
                "agent_id",
                format!(
                    "required when several agents ({}) are connected",
                    many.len()
                ),
            )
            .into()),
        }
    }

    fn instance_view(&self, row: &InstanceRow, instance: Instance, stale: bool) -> InstanceView {
        InstanceView {
            instance,
            agent_id: row.agent_id,
            account: row.account.clone(),
            stale,
            host_contradiction: row.contradiction.clone(),
        }
    }

    /// Serves one control request for `caller`.
    pub async fn handle(
        &self,
        caller: &Principal,
        request: ControlRequest,
    ) -> Result<ControlResponse, ControlError> {
        match request {
            ControlRequest::Run {
                agent_id,
                client_token,
                spec,
            } => {
                self.run_instance(caller, agent_id, client_token, spec)
                    .await
            }
            ControlRequest::Lifecycle { op, ids } => {
                let mut rows = Vec::with_capacity(ids.len());
                for id in &ids {
                    let row = self.owned_instance(caller, id).await?;
                    let ends_work = matches!(op, Lifecycle::Stop | Lifecycle::Terminate);
                    if !ends_work && row.record.state != InstanceState::Terminated {
                        self.market_gate(caller, row.agent_id, false).await?;
                    }
                    rows.push(row);
                }
                // Terminated is final: answered here, without the agent (which may have
                // forgotten the instance after its retention).
                let mut changes = Vec::new();
                let (ended, rows): (Vec<_>, Vec<_>) = rows
                    .into_iter()
                    .partition(|r| r.record.state == InstanceState::Terminated);
                for row in &ended {
                    if op != Lifecycle::Terminate {
                        return Err(ControlError::Conflict(format!(
                            "instance {} is terminated; it cannot {}",
                            row.record.id,
                            op.as_str()
                        )));
                    }
                    changes.push(StateChange {
                        instance_id: row.record.id.clone(),
                        previous: InstanceState::Terminated,
                        current: InstanceState::Terminated,
                    });
                }
                for (agent_id, ids) in group(rows.iter().map(|r| (r.agent_id, r.record.id.clone())))
                {
                    match self
                        .agent_command(
                            agent_id,
                            Command::Lifecycle {
                                op,
                                ids: ids.clone(),
                            },
                        )
                        .await?
                    {
                        // An agent speaks only for the instances it was asked about.
                        ControlReply::StateChanges(c) => {
                            changes.extend(c.into_iter().filter(|c| ids.contains(&c.instance_id)))
                        }
                        other => return Err(unexpected(agent_id, &other)),
                    }
                }
                // Keep the stored records in step with what the agents now say.
                let now = self.app.clock.now_ms();
                let updated: Vec<Instance> = rows
                    .into_iter()
                    .filter_map(|r| {
                        let c = changes.iter().find(|c| c.instance_id == r.record.id)?;
                        let mut record = r.record;
                        if record.state != c.current {
                            record.state = c.current;
                            record.state_reason = None;
                            record.state_changed_at_ms = now;
                        }
                        Some(record)
                    })
                    .collect();
                self.app.store.update_instances(&updated, now).await?;
                Ok(ControlResponse::StateChanges(changes))
            }
            ControlRequest::Describe(filters) => {
                let rows = self.visible_instances(caller, &filters.ids).await?;
                let (ended, rows): (Vec<_>, Vec<_>) = rows
                    .into_iter()
                    .partition(|r| r.record.state == InstanceState::Terminated);
                let mut out: Vec<InstanceView> = ended
                    .iter()
                    .filter(|r| filters.matches(&r.record))
                    .map(|r| self.instance_view(r, r.record.clone(), false))
                    .collect();
                for (agent_id, ids) in group(rows.iter().map(|r| (r.agent_id, r.record.id.clone())))
                {
                    let command = Command::DescribeInstances(Filters {
                        ids: ids.clone(),
                        ..filters.clone()
                    });
                    match self.agent_command(agent_id, command).await {
                        Ok(ControlReply::Instances(list)) => {
                            let mut changed = Vec::new();
                            for i in list {
                                // Only what was asked for, and only from its own host: an
                                // agent cannot answer for instances it does not hold.
                                let Some(row) = rows
                                    .iter()
                                    .find(|r| r.record.id == i.id && r.agent_id == agent_id)
                                else {
                                    tracing::warn!(%agent_id, instance = %i.id, "agent described an instance it was not asked for");
                                    continue;
                                };
                                let (record, contradiction) = self.adopt(row, i).await?;
                                // Write only what changed: describing is read-mostly.
                                if record != row.record {
                                    changed.push(record.clone());
                                }
                                // Filters apply to the recorded spec, not to the host's.
                                if filters.matches(&record) {
                                    let mut view = self.instance_view(row, record, false);
                                    view.host_contradiction = contradiction;
                                    out.push(view);
                                }
                            }
                            if !changed.is_empty() {
                                self.app
                                    .store
                                    .update_instances(&changed, self.app.clock.now_ms())
                                    .await?;
                            }
                        }
                        Ok(other) => return Err(unexpected(agent_id, &other)),
                        // An unreachable host does not hide its instances: show the last
                        // known records, marked stale.
                        Err(ControlError::Link(_)) => {
                            for row in rows.iter().filter(|r| r.agent_id == agent_id) {
                                if filters.matches(&row.record) {
                                    out.push(self.instance_view(row, row.record.clone(), true));
                                }
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                out.sort_by_key(|v| (v.instance.launched_at_ms, v.instance.id.clone()));
                Ok(ControlResponse::Instances(out))
            }
            ControlRequest::Status { ids } => {
                let rows = self.visible_instances(caller, &ids).await?;
                let (ended, rows): (Vec<_>, Vec<_>) = rows
                    .into_iter()
                    .partition(|r| r.record.state == InstanceState::Terminated);
                let mut out: Vec<InstanceStatus> = ended
                    .into_iter()
                    .map(|r| InstanceStatus {
                        instance_id: r.record.id,
                        state: InstanceState::Terminated,
                        state_reason: r.record.state_reason,
                        exit_code: None,
                        applied: Limits::default(),
                        processes: None,
                    })
                    .collect();
                for (agent_id, ids) in group(rows.iter().map(|r| (r.agent_id, r.record.id.clone())))
                {
                    match self
                        .agent_command(
                            agent_id,
                            Command::DescribeInstanceStatus { ids: ids.clone() },
                        )
                        .await?
                    {
                        ControlReply::Statuses(s) => {
                            out.extend(s.into_iter().filter(|s| ids.contains(&s.instance_id)))
                        }
                        other => return Err(unexpected(agent_id, &other)),
                    }
                }
                Ok(ControlResponse::Statuses(out))
            }
            ControlRequest::Attribute {
                instance_id,
                attribute,
            } => {
                // The recorded spec is the authority: answered here, not by the host.
                let row = self.owned_instance(caller, &instance_id).await?;
                let spec = row.record.spec;
                let value = match attribute {
                    AttributeName::Limits => AttributeValue::Limits(spec.limits),
                    AttributeName::Labels => AttributeValue::Labels(spec.labels),
                    AttributeName::Command => AttributeValue::Command(spec.command),
                    AttributeName::Image => AttributeValue::Image(spec.image),
                    AttributeName::Ports => AttributeValue::Ports(spec.ports),
                    AttributeName::Volumes => AttributeValue::Volumes(spec.volumes),
                };
                Ok(ControlResponse::Attribute { instance_id, value })
            }
            ControlRequest::Modify {
                instance_id,
                limits,
                labels,
            } => {
                // One modification of an instance at a time: the record read here is
                // the one the agent's change applies to, and the history keeps their
                // order.
                let _guard = self.instance_locks.lock(&instance_id).await;
                let row = self.owned_instance(caller, &instance_id).await?;
                let reservation = self.market_gate(caller, row.agent_id, false).await?;
                // Only the fields named change; the rest stays as recorded.
                let new_limits = limits.map(|c| c.apply(row.record.spec.limits));
                if let Some(l) = &new_limits {
                    l.validate("limits")?;
                    if let Some(r) = reservation.as_ref().and_then(|h| h.reservation()) {
                        self.fits_reservation(r, l, Some(&instance_id)).await?;
                    }
                }
                let reply = self
                    .agent_command(
                        row.agent_id,
                        Command::ModifyInstanceAttribute {
                            instance_id: instance_id.clone(),
                            limits: new_limits,
                            labels: labels.clone(),
                        },
                    )
                    .await?;
                let now = self.app.clock.now_ms();
                let mut record = row.record.clone();
                if let Some(l) = new_limits {
                    record.spec.limits = l;
                    if l != row.record.spec.limits {
                        // Billing rates each part of a period with the limits in force.
                        self.app.store.record_limits(&instance_id, now, &l).await?;
                    }
                }
                if let Some(l) = labels {
                    record.spec.labels = l;
                }
                self.app
                    .store
                    .update_instances(&[record.clone()], now)
                    .await?;
                // The answer is the recorded value, whatever the host echoed.
                let ControlReply::Attribute { .. } = reply else {
                    return Err(unexpected(row.agent_id, &reply));
                };
                let value = match new_limits {
                    Some(l) => AttributeValue::Limits(l),
                    None => AttributeValue::Labels(record.spec.labels),
                };
                Ok(ControlResponse::Attribute { instance_id, value })
            }
            ControlRequest::CreateVolume {
                agent_id,
                name,
                size_bytes,
            } => {
                if !may_create(caller) {
                    return Err(ControlError::Forbidden(
                        "creating volumes needs the client role".into(),
                    ));
                }
                let agent_id = self
                    .placement(self.held_or(caller, agent_id).await?)
                    .await?;
                self.market_gate(caller, agent_id, true).await?;
                let volume_id = new_id(VOLUME_PREFIX);
                let reply = self
                    .agent_command(
                        agent_id,
                        Command::CreateVolume {
                            volume_id: volume_id.clone(),
                            name,
                            size_bytes,
                        },
                    )
                    .await?;
                self.volumes_response(agent_id, caller, &volume_id, reply)
                    .await
            }
            ControlRequest::DeleteVolume { volume_id } => {
                let row = self.owned_volume(caller, &volume_id).await?;
                let reply = self
                    .agent_command(
                        row.agent_id,
                        Command::DeleteVolume {
                            volume_id: volume_id.clone(),
                        },
                    )
                    .await?;
                self.volumes_response(row.agent_id, &row.owner(), &volume_id, reply)
                    .await
            }
            ControlRequest::DescribeVolumes { ids } => {
                let rows = match ids.is_empty() {
                    true => {
                        let owner = (caller.role != Role::Admin).then_some(caller);
                        self.app.store.volumes(owner).await?
                    }
                    false => {
                        let mut rows = Vec::new();
                        for id in &ids {
                            rows.push(self.owned_volume(caller, id).await?);
                        }
                        rows
                    }
                };
                let mut out = Vec::new();
                for (agent_id, ids) in group(rows.iter().map(|r| (r.agent_id, r.record.id.clone())))
                {
                    match self
                        .agent_command(agent_id, Command::DescribeVolumes { ids })
                        .await
                    {
                        Ok(ControlReply::Volumes(list)) => {
                            for v in list {
                                let Some(row) = rows
                                    .iter()
                                    .find(|r| r.record.id == v.id && r.agent_id == agent_id)
                                else {
                                    tracing::warn!(%agent_id, volume = %v.id, "agent described a volume it was not asked for");
                                    continue;
                                };
                                self.app
                                    .store
                                    .put_volume(&VolumeRow {
                                        record: v.clone(),
                                        updated_at_ms: self.app.clock.now_ms(),
                                        ..row.clone()
                                    })
                                    .await?;
                                out.push(VolumeView {
                                    volume: v,
                                    agent_id,
                                    account: row.account.clone(),
                                    stale: false,
                                    snapshots: Vec::new(),
                                });
                            }
                        }
                        Ok(other) => return Err(unexpected(agent_id, &other)),
                        Err(ControlError::Link(_)) => {
                            out.extend(rows.iter().filter(|r| r.agent_id == agent_id).map(|r| {
                                VolumeView {
                                    volume: r.record.clone(),
                                    agent_id,
                                    account: r.account.clone(),
                                    stale: true,
                                    snapshots: Vec::new(),
                                }
                            }));
                        }
                        Err(e) => return Err(e),
                    }
                }
                out.sort_by_key(|v| (v.volume.created_at_ms, v.volume.id.clone()));
                let ids: Vec<String> = out.iter().map(|v| v.volume.id.clone()).collect();
                for snapshot in self.app.store.snapshots(&ids).await? {
                    if let Some(v) = out.iter_mut().find(|v| v.volume.id == snapshot.volume_id) {
                        v.snapshots.push(snapshot);
                    }
                }
                Ok(ControlResponse::Volumes(out))
            }
            ControlRequest::Logs {
                instance_id,
                max_bytes,
            } => {
                let row = self.owned_instance(caller, &instance_id).await?;
                if row.record.state == InstanceState::Terminated {
                    return Err(ControlError::Conflict(format!(
                        "instance {instance_id} is terminated; its output is gone"
                    )));
                }
                match self
                    .agent_command(
                        row.agent_id,
                        Command::ReadLogs {
                            instance_id: instance_id.clone(),
                            max_bytes,
                        },
                    )
                    .await?
                {
                    // Only the output of the instance asked for.
                    ControlReply::Logs(l) if l.instance_id == instance_id => {
                        Ok(ControlResponse::Logs(l))
                    }
                    other => Err(unexpected(row.agent_id, &other)),
                }
            }
            ControlRequest::CreateSnapshot { volume_id } => {
                let row = self.owned_volume(caller, &volume_id).await?;
                self.market_gate(caller, row.agent_id, false).await?;
                let snapshot_id = new_id(SNAPSHOT_PREFIX);
                match self
                    .agent_command(
                        row.agent_id,
                        Command::CreateSnapshot {
                            volume_id,
                            snapshot_id: snapshot_id.clone(),
                        },
                    )
                    .await?
                {
                    // The agent speaks only for the snapshot it was asked to take.
                    ControlReply::Snapshot(s)
                        if s.id == snapshot_id && s.volume_id == row.record.id =>
                    {
                        self.app.store.put_snapshot(row.agent_id, &s).await?;
                        Ok(ControlResponse::Snapshot(s))
                    }
                    other => Err(unexpected(row.agent_id, &other)),
                }
            }
        }
    }

    async fn visible_instances(
        &self,
        caller: &Principal,
        ids: &[String],
    ) -> Result<Vec<InstanceRow>, ControlError> {
        if ids.is_empty() {
            // Instances terminated longer ago than the retention are shown only when
            // asked for by id.
            let owner = (caller.role != Role::Admin).then_some(caller);
            let now = self.app.clock.now_ms();
            let horizon =
                i64::try_from(self.app.config.terminated_retention.as_millis()).unwrap_or(i64::MAX);
            let mut rows = self.app.store.instances(owner).await?;
            rows.retain(|r| {
                r.record.state != InstanceState::Terminated
                    || now.saturating_sub(r.record.state_changed_at_ms) < horizon
            });
            return Ok(rows);
        }
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            rows.push(self.owned_instance(caller, id).await?);
        }
        Ok(rows)
    }

    async fn volumes_response(
        &self,
        agent_id: Uuid,
        owner: &Principal,
        volume_id: &str,
        reply: ControlReply,
    ) -> Result<ControlResponse, ControlError> {
        let ControlReply::Volumes(list) = reply else {
            return Err(unexpected(agent_id, &reply));
        };
        let mut out = Vec::new();
        // The agent speaks only for the volume it was asked about.
        for v in list.into_iter().filter(|v| v.id == volume_id) {
            self.app
                .store
                .put_volume(&VolumeRow {
                    agent_id,
                    account: owner.account.clone(),
                    owner_role: owner.role,
                    record: v.clone(),
                    updated_at_ms: self.app.clock.now_ms(),
                })
                .await?;
            out.push(VolumeView {
                volume: v,
                agent_id,
                account: owner.account.clone(),
                stale: false,
                snapshots: Vec::new(),
            });
        }
        Ok(ControlResponse::Volumes(out))
    }

    async fn run_instance(
        &self,
        caller: &Principal,
        agent_id: Option<Uuid>,
        client_token: Option<String>,
        spec: RunSpec,
    ) -> Result<ControlResponse, ControlError> {
        if !may_create(caller) {
            return Err(ControlError::Forbidden(
                "running instances needs the client role".into(),
            ));
        }
        // Volumes decide the host: they live on one agent.
        let mut volume_agent = None;
        for (n, a) in spec.volumes.iter().enumerate() {
            let row = self
                .owned_volume(caller, &a.volume_id)
                .await
                .map_err(|e| match e {
                    ControlError::NotFound(m) => {
                        Invalid::new(format!("volumes[{n}].volume_id"), m).into()
                    }
                    other => other,
                })?;
            if volume_agent.is_some_and(|v| v != row.agent_id)
                || agent_id.is_some_and(|a| a != row.agent_id)
            {
                return Err(Invalid::new(
                    format!("volumes[{n}].volume_id"),
                    "volumes live on one agent; all of them and the instance must be on the same one",
                )
                .into());
            }
            volume_agent = Some(row.agent_id);
        }
        let agent_id = self
            .placement(self.held_or(caller, agent_id.or(volume_agent)).await?)
            .await?;
        // On a host the market sells, only the holder of its reservation runs, within
        // the reservation's size: checked and claimed under the host's lock, so that
        // two runs at once cannot both fit in what only one fits in. A retry of a run
        // already claimed is not counted twice.
        let reservation = self.market_gate(caller, agent_id, true).await?;
        let _host = match &reservation {
            Some(_) => Some(self.instance_locks.lock(&format!("host:{agent_id}")).await),
            None => None,
        };
        let retry = match &client_token {
            Some(t) => self.app.store.instance_by_token(caller, t).await?.is_some(),
            None => false,
        };
        if let (Some(r), false) = (reservation.as_ref().and_then(|h| h.reservation()), retry) {
            self.fits_reservation(r, &spec.limits, None).await?;
        }
        // The host's rate card as of this request goes with the instance: what the
        // funds check covers is what the instance is billed by. On a reserved host the
        // reservation pays for the host by the hour (`Reservation::charge`), and its
        // instances carry no price of their own.
        let plan = match &reservation {
            Some(_) => None,
            None => self.app.store.agent_price_plan(agent_id).await?,
        };
        if !retry {
            self.check_funds(caller, plan.as_ref()).await?;
        }
        let now = self.app.clock.now_ms();
        let instance_id = new_id(INSTANCE_PREFIX);
        let row = InstanceRow {
            agent_id,
            account: caller.account.clone(),
            owner_role: caller.role,
            client_token: client_token.clone(),
            request_hash: request_hash(agent_id, &spec),
            record: Instance {
                id: instance_id.clone(),
                spec: spec.clone(),
                state: InstanceState::Pending,
                state_reason: None,
                driver: String::new(),
                native_id: None,
                launched_at_ms: now,
                state_changed_at_ms: now,
            },
            created_at_ms: now,
            updated_at_ms: now,
            started_at_ms: None,
            contradiction: None,
        };
        let row = match self.app.store.claim_instance(&row, plan.as_ref()).await? {
            Claim::Created => row,
            Claim::Existing(existing) => {
                if existing.request_hash != row.request_hash && client_token.is_some() {
                    return Err(ControlError::Conflict(format!(
                        "client token {:?} was used for a different request (instance {})",
                        client_token.unwrap_or_default(),
                        existing.record.id
                    )));
                }
                // A retry: send the original command again (the agent is idempotent by
                // instance id), so a first attempt that timed out still completes.
                *existing
            }
        };
        let command = Command::RunInstances {
            instance_id: row.record.id.clone(),
            spec: row.record.spec.clone(),
        };
        let reply = match self.agent_command(row.agent_id, command).await {
            Ok(reply) => reply,
            Err(ControlError::Agent { agent_id, failure }) => {
                // The agent keeps a terminated record of a failed start; mirror it.
                let mut record = row.record.clone();
                record.state = InstanceState::Terminated;
                record.state_reason = Some(format!("failed to start: {failure}"));
                self.app
                    .store
                    .update_instances(&[record], self.app.clock.now_ms())
                    .await?;
                return Err(ControlError::Agent { agent_id, failure });
            }
            Err(e) => return Err(e),
        };
        match reply {
            ControlReply::Instances(list) => {
                let mut out = Vec::new();
                // The agent speaks only for the instance it was asked to run.
                for i in list.into_iter().filter(|i| i.id == row.record.id) {
                    let (record, contradiction) = self.adopt(&row, i).await?;
                    self.app
                        .store
                        .update_instances(std::slice::from_ref(&record), self.app.clock.now_ms())
                        .await?;
                    let mut view = self.instance_view(&row, record, false);
                    view.host_contradiction = contradiction;
                    out.push(view);
                }
                Ok(ControlResponse::Instances(out))
            }
            other => Err(unexpected(row.agent_id, &other)),
        }
    }

    /// A prepaid client must be able to cover the host's upfront fee and the
    /// configured minimum before an instance is run for it (402 otherwise); postpaid
    /// clients and hosts without a rate card are not checked.
    async fn check_funds(
        &self,
        caller: &Principal,
        plan: Option<&crate::billing::PricePlan>,
    ) -> Result<(), ControlError> {
        if caller.role != Role::Client {
            return Ok(());
        }
        let Some(plan) = plan else {
            return Ok(());
        };
        let account = crate::ledger::client(&caller.account);
        let Some(balance) =
            crate::market::prepaid_balance(self.app.store.as_ref(), &account, &plan.currency)
                .await?
        else {
            return Ok(());
        };
        let needed = plan
            .upfront
            .saturating_add(self.app.config.prepaid_minimum.max(0));
        if balance < needed {
            return Err(ControlError::InsufficientFunds {
                account,
                currency: plan.currency.clone(),
                balance,
                needed,
            });
        }
        Ok(())
    }

    /// What to keep of an agent's answer about `row`: what the host observes (state,
    /// reason, native id, driver, when the state changed), never the spec, which stays
    /// as the client asked for it. An answer that contradicts the recorded spec is
    /// logged, counted in `/metrics` and kept on the instance for people; it is never
    /// billed. Returns the record and the contradiction now in force.
    async fn adopt(
        &self,
        row: &InstanceRow,
        reported: Instance,
    ) -> Result<(Instance, Option<String>), ControlError> {
        let found = contradiction(&row.record.spec, &reported.spec);
        if let Some((fields, _)) = &found {
            for field in fields {
                self.app
                    .metrics
                    .spec_contradictions
                    .get_or_create(&vec![("field", *field)])
                    .inc();
            }
        }
        let text = found.map(|(_, t)| t);
        if text != row.contradiction {
            match &text {
                Some(t) => {
                    tracing::warn!(agent_id = %row.agent_id, instance = %row.record.id, contradiction = %t,
                    "an agent's answer contradicts the instance's recorded spec; the recorded spec stays")
                }
                None => tracing::info!(agent_id = %row.agent_id, instance = %row.record.id,
                    "the agent's answers agree with the recorded spec again"),
            }
            self.app
                .store
                .set_contradiction(&row.record.id, text.as_deref(), self.app.clock.now_ms())
                .await?;
        }
        let record = Instance {
            id: row.record.id.clone(),
            spec: row.record.spec.clone(),
            launched_at_ms: row.record.launched_at_ms,
            ..reported
        };
        Ok((record, text))
    }

    /// Brings the stored records of one agent in line with what it reports; run when
    /// an agent (re)connects, so a command that was cut off by a crash is settled.
    pub async fn reconcile(&self, agent_id: Uuid) -> Result<(), ControlError> {
        let rows = self.app.store.agent_instances(agent_id).await?;
        if !rows.is_empty() {
            let ControlReply::Instances(reported) = self
                .agent_command(agent_id, Command::DescribeInstances(Filters::default()))
                .await?
            else {
                return Err(LinkError::Failed {
                    agent_id,
                    message: "unexpected answer to DescribeInstances".into(),
                }
                .into());
            };
            let now = self.app.clock.now_ms();
            let mut records: Vec<Instance> = Vec::new();
            for i in &reported {
                if let Some(row) = rows.iter().find(|r| r.record.id == i.id) {
                    records.push(self.adopt(row, i.clone()).await?.0);
                }
            }
            for row in &rows {
                let known = reported.iter().any(|i| i.id == row.record.id);
                if !known && row.record.state != InstanceState::Terminated {
                    let mut record = row.record.clone();
                    record.state = InstanceState::Terminated;
                    record.state_reason = Some(
                        "the agent has no record of this instance (it was lost before it started)"
                            .into(),
                    );
                    record.state_changed_at_ms = now;
                    records.push(record);
                }
            }
            self.app.store.update_instances(&records, now).await?;
            tracing::info!(%agent_id, instances = records.len(), "instances reconciled");
        }
        Ok(())
    }
}

/// `row` when it exists (404) and `caller` may act on it (403).
fn owned<T>(
    caller: &Principal,
    what: &str,
    id: &str,
    row: Option<T>,
    owner: impl Fn(&T) -> Principal,
) -> Result<T, ControlError> {
    let row = row.ok_or_else(|| ControlError::NotFound(format!("{what} {id} not found")))?;
    if !authorise(caller, &owner(&row)) {
        return Err(ControlError::Forbidden(format!(
            "{what} {id} belongs to another owner ({} {} is not it)",
            caller.role.as_str(),
            caller.account
        )));
    }
    Ok(row)
}

fn group(items: impl Iterator<Item = (Uuid, String)>) -> Vec<(Uuid, Vec<String>)> {
    let mut by_agent: HashMap<Uuid, Vec<String>> = HashMap::new();
    let mut order = Vec::new();
    for (agent, id) in items {
        by_agent.entry(agent).or_insert_with(|| {
            order.push(agent);
            Vec::new()
        });
        by_agent.get_mut(&agent).expect("inserted").push(id);
    }
    order
        .into_iter()
        .map(|a| (a, by_agent.remove(&a).expect("present")))
        .collect()
}

fn unexpected(agent_id: Uuid, reply: &ControlReply) -> ControlError {
    LinkError::Failed {
        agent_id,
        message: format!("unexpected answer {reply:?}"),
    }
    .into()
}

/// The fields of `reported` that differ from the `recorded` spec, with both values
/// where they are short. Pure.
pub fn contradiction(
    recorded: &RunSpec,
    reported: &RunSpec,
) -> Option<(Vec<&'static str>, String)> {
    let mut fields = Vec::new();
    let mut text = Vec::new();
    if recorded.limits != reported.limits {
        fields.push("limits");
        text.push(format!(
            "limits: the host reports {}, recorded {}",
            serde_json::to_string(&reported.limits).unwrap_or_default(),
            serde_json::to_string(&recorded.limits).unwrap_or_default()
        ));
    }
    for (field, differs) in [
        ("labels", recorded.labels != reported.labels),
        ("command", recorded.command != reported.command),
        ("image", recorded.image != reported.image),
        ("env", recorded.env != reported.env),
        ("ports", recorded.ports != reported.ports),
        ("volumes", recorded.volumes != reported.volumes),
        ("name", recorded.name != reported.name),
    ] {
        if differs {
            fields.push(field);
            text.push(format!(
                "{field}: the host reports other values than recorded"
            ));
        }
    }
    (!fields.is_empty()).then(|| (fields, text.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(body: Value) -> String {
        parse_request(body).unwrap_err().field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(json!({})), "action");
        assert_eq!(field(json!({"action": "LaunchRockets"})), "action");
        assert_eq!(
            field(json!({"action": "RunInstances", "imagee": "x"})),
            "imagee"
        );
        assert_eq!(
            field(json!({"action": "RunInstances", "limits": {"millicpus": "lots"}})),
            "limits.millicpus"
        );
        assert_eq!(
            field(json!({"action": "RunInstances", "name": "a;rm -rf /"})),
            "name"
        );
        assert_eq!(field(json!({"action": "StopInstances"})), "ids");
        assert_eq!(
            field(json!({"action": "StopInstances", "ids": ["../etc"]})),
            "ids[0]"
        );
        assert_eq!(field(json!({"action": "CreateVolume"})), "size_bytes");
        assert_eq!(
            field(json!({"action": "DeleteVolume", "volume_id": "vol-../../x"})),
            "volume_id"
        );
        assert_eq!(
            field(json!({"action": "RunInstances", "agent_id": "nope"})),
            "agent_id"
        );
    }

    #[test]
    fn a_full_run_request_parses() {
        let r = parse_request(json!({
            "action": "RunInstances",
            "client_token": "t-1",
            "image": "surplus/busybox:latest",
            "command": ["sleep", "60"],
            "limits": {"millicpus": 500, "memory_bytes": 67108864},
            "ports": [{"host_port": 8080, "instance_port": 80}],
            "labels": {"team": "$(whoami)"},
        }))
        .unwrap();
        let ControlRequest::Run {
            client_token, spec, ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(client_token.as_deref(), Some("t-1"));
        assert_eq!(spec.labels["team"], "$(whoami)");
        assert_eq!(spec.ports[0].protocol, PortProtocol::Tcp);
    }

    #[test]
    fn only_owners_and_admins_may_act() {
        let alice = Principal {
            account: "alice".into(),
            role: Role::Client,
        };
        let admin = Principal {
            account: "admin".into(),
            role: Role::Admin,
        };
        let provider = Principal {
            account: "p".into(),
            role: Role::Provider,
        };
        let named = |role: Role, account: &str| Principal {
            account: account.into(),
            role,
        };
        assert!(authorise(&alice, &named(Role::Client, "alice")));
        assert!(!authorise(&alice, &named(Role::Client, "bob")));
        assert!(authorise(&admin, &named(Role::Client, "bob")));
        // The same name in another role is another principal, both ways.
        for role in [Role::Provider, Role::PoolOwner] {
            assert!(!authorise(&named(role, "alice"), &alice), "{role:?}");
            assert!(!authorise(&alice, &named(role, "alice")), "{role:?}");
        }
        assert!(may_create(&alice) && may_create(&admin) && !may_create(&provider));
    }

    #[test]
    fn grouping_keeps_first_seen_agent_order() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let g = group([(b, "x".into()), (a, "y".into()), (b, "z".into())].into_iter());
        assert_eq!(
            g,
            vec![(b, vec!["x".into(), "z".into()]), (a, vec!["y".into()])]
        );
    }

    /// What the CLI (and any client of `surplus-api`) writes, the server reads as the
    /// request it means, for every action.
    #[test]
    fn every_typed_call_parses_as_what_it_means() {
        use surplus_api::control::ControlCall;
        let agent = Uuid::from_u128(7);
        let ids = vec!["i-0123456789abcdef".to_owned()];
        let volume = "vol-0123456789abcdef".to_owned();
        let spec = RunSpec {
            name: Some("web".into()),
            image: None,
            command: vec!["/bin/sleep".into(), "600".into()],
            env: BTreeMap::from([("MODE".into(), "fast".into())]),
            limits: Limits {
                millicpus: Some(500),
                memory_bytes: Some(64 << 20),
                pids: None,
            },
            ports: vec![PortMapping {
                host_port: 8080,
                instance_port: 80,
                protocol: PortProtocol::Udp,
            }],
            labels: BTreeMap::from([("team".into(), "red".into())]),
            volumes: vec![VolumeAttachment {
                volume_id: volume.clone(),
                mount_path: "/data".into(),
            }],
        };
        let filters = Filters {
            ids: ids.clone(),
            states: vec![InstanceState::Running, InstanceState::ShuttingDown],
            labels: BTreeMap::from([("team".into(), "red".into())]),
        };
        let only_memory = LimitsChange {
            memory_bytes: Some(Some(128 << 20)),
            ..LimitsChange::default()
        };
        let lifting = LimitsChange {
            pids: Some(None),
            ..LimitsChange::default()
        };
        let cases = vec![
            (
                ControlCall::RunInstances {
                    agent_id: Some(agent),
                    client_token: Some("retry-1".into()),
                    spec: spec.clone(),
                },
                ControlRequest::Run {
                    agent_id: Some(agent),
                    client_token: Some("retry-1".into()),
                    spec: spec.clone(),
                },
            ),
            (
                ControlCall::RunInstances {
                    agent_id: None,
                    client_token: None,
                    spec: RunSpec {
                        command: vec!["/bin/true".into()],
                        ..RunSpec::default()
                    },
                },
                ControlRequest::Run {
                    agent_id: None,
                    client_token: None,
                    spec: RunSpec {
                        command: vec!["/bin/true".into()],
                        ..RunSpec::default()
                    },
                },
            ),
        ]
        .into_iter()
        .chain(
            [
                (
                    Lifecycle::Start,
                    ControlCall::StartInstances { ids: ids.clone() },
                ),
                (
                    Lifecycle::Stop,
                    ControlCall::StopInstances { ids: ids.clone() },
                ),
                (
                    Lifecycle::Reboot,
                    ControlCall::RebootInstances { ids: ids.clone() },
                ),
                (
                    Lifecycle::Terminate,
                    ControlCall::TerminateInstances { ids: ids.clone() },
                ),
            ]
            .map(|(op, call)| {
                (
                    call,
                    ControlRequest::Lifecycle {
                        op,
                        ids: ids.clone(),
                    },
                )
            }),
        )
        .chain([
            (
                ControlCall::DescribeInstances(filters.clone()),
                ControlRequest::Describe(filters),
            ),
            (
                ControlCall::DescribeInstanceStatus { ids: ids.clone() },
                ControlRequest::Status { ids: ids.clone() },
            ),
            (
                ControlCall::DescribeInstanceAttribute {
                    instance_id: ids[0].clone(),
                    attribute: AttributeName::Ports,
                },
                ControlRequest::Attribute {
                    instance_id: ids[0].clone(),
                    attribute: AttributeName::Ports,
                },
            ),
            // Only the limit given changes; the others are absent, not null (which
            // would lift them).
            (
                ControlCall::ModifyInstanceAttribute {
                    instance_id: ids[0].clone(),
                    limits: Some(only_memory),
                    labels: None,
                },
                ControlRequest::Modify {
                    instance_id: ids[0].clone(),
                    limits: Some(only_memory),
                    labels: None,
                },
            ),
            (
                ControlCall::ModifyInstanceAttribute {
                    instance_id: ids[0].clone(),
                    limits: Some(lifting),
                    labels: Some(BTreeMap::from([("team".into(), "blue".into())])),
                },
                ControlRequest::Modify {
                    instance_id: ids[0].clone(),
                    limits: Some(lifting),
                    labels: Some(BTreeMap::from([("team".into(), "blue".into())])),
                },
            ),
            (
                ControlCall::CreateVolume {
                    agent_id: Some(agent),
                    name: Some("scratch".into()),
                    size_bytes: 1 << 30,
                },
                ControlRequest::CreateVolume {
                    agent_id: Some(agent),
                    name: Some("scratch".into()),
                    size_bytes: 1 << 30,
                },
            ),
            (
                ControlCall::DeleteVolume {
                    volume_id: volume.clone(),
                },
                ControlRequest::DeleteVolume {
                    volume_id: volume.clone(),
                },
            ),
            (
                ControlCall::DescribeVolumes { ids: Vec::new() },
                ControlRequest::DescribeVolumes { ids: Vec::new() },
            ),
            (
                ControlCall::CreateSnapshot {
                    volume_id: volume.clone(),
                },
                ControlRequest::CreateSnapshot { volume_id: volume },
            ),
        ])
        .collect::<Vec<_>>();
        let mut actions = std::collections::BTreeSet::new();
        for (call, want) in cases {
            let body = serde_json::to_value(&call).expect("a call serializes");
            assert_eq!(body["action"], call.action(), "{body}");
            assert_eq!(parse_request(body.clone()), Ok(want), "{body}");
            actions.insert(call.action());
        }
        // Every action the server accepts has a typed call, and was tried above.
        assert_eq!(
            actions,
            ACTIONS.iter().copied().collect(),
            "a typed call is missing"
        );
    }
}
