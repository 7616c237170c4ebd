//! The `mapped` driver: a provider's own control API, described by a TOML mapping file
//! (the "supports another specification" case of capability A5).
//!
//! Each operation of the primary interface maps to steps: HTTP requests against the
//! provider's API (over TCP or a Unix socket), or runs of an allow-listed executable.
//! Templates name typed variables as `{{name}}`; a value is substituted as a JSON value
//! in bodies, as one percent-encoded segment in paths and as exactly one argument in
//! argument lists. There is no shell and no string splicing a value could escape from.
//! Unmapped operations are reported unsupported. `deploy/mapped-docker.toml` drives the
//! Docker Engine's HTTP API directly and passes the compatibility kit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use surplus_protocol::control::*;
use tokio::io::AsyncWriteExt;

use super::{Driver, DriverError, Mount, Observed};

/// `[control.mapped]` in the agent configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MappedConfig {
    /// The mapping file.
    pub file: PathBuf,
    /// Where snapshot bodies go; empty means `<data_dir>/control/snapshots`.
    pub snapshot_dir: PathBuf,
}

/// The mapping file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Shown as `mapped:<name>`.
    pub name: String,
    /// Where the provider's API listens.
    #[serde(default)]
    pub endpoint: Endpoint,
    /// Executables steps may run (absolute paths).
    #[serde(default)]
    pub allowed_programs: Vec<PathBuf>,
    /// Fixed values templates may use.
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
    /// Operation name → steps. Names: run, start, stop, reboot, terminate, inspect,
    /// set_limits, volume_create, volume_delete, snapshot.
    pub ops: BTreeMap<String, Operation>,
}

/// The provider API's address.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// A Unix socket.
    pub unix_socket: Option<PathBuf>,
    /// A TCP `host:port`.
    pub address: Option<String>,
    /// `Host` header value.
    #[serde(default = "default_host")]
    pub host: String,
    /// Per-request time limit.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_host() -> String {
    "localhost".into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

/// One operation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Run in order; a step failing stops the operation.
    pub steps: Vec<Step>,
    /// For `inspect`: how to read the last answer.
    pub read: Option<Reading>,
}

/// One request or program run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// HTTP method (with `path`).
    pub method: Option<String>,
    /// HTTP path and query template.
    pub path: Option<String>,
    /// JSON body template.
    pub body: Option<String>,
    /// Allow-listed executable (instead of `method`/`path`).
    pub program: Option<PathBuf>,
    /// Argument templates; each becomes exactly one argument.
    #[serde(default)]
    pub args: Vec<String>,
    /// HTTP statuses that count as success (default: any 2xx).
    #[serde(default)]
    pub accept: Vec<u16>,
    /// Variables to set from the JSON answer: name → JSON pointer.
    #[serde(default)]
    pub capture: BTreeMap<String, String>,
    /// Stream the answer's body into the snapshot file.
    #[serde(default)]
    pub save_body: bool,
    /// Run even when an earlier step failed (cleanup).
    #[serde(default)]
    pub always: bool,
}

/// How `inspect` reads the host's view from the last answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    /// Statuses meaning the instance no longer exists.
    #[serde(default)]
    pub gone_status: Vec<u16>,
    /// JSON pointer to the native state.
    pub state: String,
    /// Native state → `running`, `stopped` or `gone`.
    pub states: BTreeMap<String, String>,
    /// JSON pointer to the exit code.
    pub exit_code: Option<String>,
    /// JSON pointer to the applied CPU limit in billionths of a CPU.
    pub nano_cpus: Option<String>,
    /// JSON pointer to the applied CPU limit in thousandths of a CPU.
    pub millicpus: Option<String>,
    /// JSON pointer to the applied memory limit in bytes.
    pub memory_bytes: Option<String>,
    /// JSON pointer to the applied process limit.
    pub pids: Option<String>,
}

/// Variables every template may use. Per-operation ones are only set where they mean
/// something; using one that is unset is an error naming it.
pub const VARIABLES: &[&str] = &[
    "id",
    "native_id",
    "name",
    "image",
    "command",
    "env",
    "env_list",
    "labels",
    "millicpus",
    "nano_cpus",
    "cpu_quota",
    "cpu_period",
    "memory_bytes",
    "memory_swap",
    "pids",
    "ports",
    "exposed_ports",
    "port_bindings",
    "binds",
    "grace_secs",
    "volume_id",
    "volume_native_id",
    "size_bytes",
    "snapshot_id",
];

const OPERATIONS: &[&str] = &[
    "run",
    "start",
    "stop",
    "reboot",
    "terminate",
    "inspect",
    "set_limits",
    "volume_create",
    "volume_delete",
    "snapshot",
];

/// `{{name}}` occurrences in a template, or an error for an unclosed one.
fn placeholders(template: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed {{{{ in {template:?}"))?;
        out.push(after[..end].trim());
        rest = &after[end + 2..];
    }
    Ok(out)
}

/// What a substituted value may keep unencoded in a path: letters, digits, `-`, `_`
/// and `~`. A `.` is encoded, so no value becomes a `..` segment; a `/`, `?`, `&` or
/// `%` can never change the request's shape.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// How a value is written into a template.
#[derive(Clone, Copy)]
enum Context {
    Json,
    PathSegment,
    Argument,
}

fn render(
    template: &str,
    vars: &BTreeMap<String, Value>,
    context: Context,
) -> Result<String, DriverError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").expect("checked at load");
        let name = after[..end].trim();
        let value = vars.get(name).ok_or_else(|| {
            DriverError::Failed(format!(
                "mapping uses {{{{{name}}}}}, which this operation does not set"
            ))
        })?;
        match context {
            Context::Json => out.push_str(&value.to_string()),
            Context::PathSegment | Context::Argument => {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(DriverError::Failed(format!(
                            "{{{{{name}}}}} is a list or map; only single values go into paths and arguments"
                        )));
                    }
                };
                if let Context::PathSegment = context {
                    out.extend(percent_encoding::utf8_percent_encode(&text, SEGMENT));
                } else {
                    out.push_str(&text);
                }
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Mapping {
    /// Parses and checks a mapping: known operations and variables, closed templates,
    /// allow-listed programs, JSON pointers.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mapping: Mapping = toml::from_str(text).map_err(|e| e.to_string())?;
        validate_name("name", &mapping.name).map_err(|e| e.to_string())?;
        if mapping.endpoint.unix_socket.is_some() == mapping.endpoint.address.is_some()
            && mapping
                .ops
                .values()
                .any(|o| o.steps.iter().any(|s| s.method.is_some()))
        {
            return Err("endpoint: give exactly one of unix_socket and address".into());
        }
        for (op, operation) in &mapping.ops {
            if !OPERATIONS.contains(&op.as_str()) {
                return Err(format!(
                    "ops.{op}: unknown operation (known: {})",
                    OPERATIONS.join(", ")
                ));
            }
            if (op == "inspect") != operation.read.is_some() {
                return Err(format!(
                    "ops.{op}: `read` belongs to inspect, and inspect needs it"
                ));
            }
            let mut captured: Vec<&str> = Vec::new();
            for (n, step) in operation.steps.iter().enumerate() {
                let at = format!("ops.{op}.steps[{n}]");
                match (&step.method, &step.path, &step.program) {
                    (Some(m), Some(_), None) => {
                        if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str()) {
                            return Err(format!(
                                "{at}.method: {m:?} is not GET, POST, PUT, PATCH or DELETE"
                            ));
                        }
                    }
                    (None, None, Some(p)) => {
                        if !mapping.allowed_programs.contains(p) {
                            return Err(format!(
                                "{at}.program: {} is not in allowed_programs",
                                p.display()
                            ));
                        }
                        if step.body.is_some() || step.save_body {
                            return Err(format!("{at}: programs take args, not a body"));
                        }
                    }
                    _ => return Err(format!("{at}: give method and path, or program")),
                }
                let templates = step
                    .path
                    .iter()
                    .chain(step.body.iter())
                    .chain(step.args.iter());
                for t in templates {
                    for var in placeholders(t).map_err(|e| format!("{at}: {e}"))? {
                        let known = VARIABLES.contains(&var)
                            || mapping.constants.contains_key(var)
                            || captured.contains(&var);
                        if !known {
                            return Err(format!("{at}: unknown variable {{{{{var}}}}}"));
                        }
                    }
                }
                for (name, pointer) in &step.capture {
                    if !pointer.is_empty() && !pointer.starts_with('/') {
                        return Err(format!(
                            "{at}.capture.{name}: {pointer:?} is not a JSON pointer"
                        ));
                    }
                }
                captured.extend(step.capture.keys().map(String::as_str));
            }
            if let Some(read) = &operation.read {
                for target in read.states.values() {
                    if !["running", "stopped", "gone"].contains(&target.as_str()) {
                        return Err(format!(
                            "ops.inspect.read.states: {target:?} is not running, stopped or gone"
                        ));
                    }
                }
            }
        }
        Ok(mapping)
    }
}

/// The mapped driver.
pub struct MappedDriver {
    mapping: Mapping,
    snapshots: PathBuf,
}

/// The answer of one step.
struct Answer {
    status: u16,
    json: Value,
}

fn pointer_u64(json: &Value, pointer: &Option<String>) -> Option<u64> {
    pointer
        .as_ref()
        .and_then(|p| json.pointer(p))
        .and_then(Value::as_u64)
        .filter(|&v| v > 0)
}

impl MappedDriver {
    /// Loads the mapping file named in the configuration.
    pub fn open(config: &MappedConfig, data_dir: &Path) -> Result<Self, DriverError> {
        let text = std::fs::read_to_string(&config.file).map_err(|e| {
            DriverError::failed(&format!("mapping file {}", config.file.display()), e)
        })?;
        let mapping = Mapping::parse(&text).map_err(|e| {
            DriverError::Failed(format!("mapping file {}: {e}", config.file.display()))
        })?;
        let snapshots = super::snapshot_dir(&config.snapshot_dir, data_dir)?;
        tracing::info!(mapping = %mapping.name, operations = mapping.ops.len(), "mapped driver ready");
        Ok(Self { mapping, snapshots })
    }

    fn base_vars(&self) -> BTreeMap<String, Value> {
        self.mapping
            .constants
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect()
    }

    fn instance_vars(
        &self,
        id: &str,
        native: Option<&str>,
        spec: &RunSpec,
        mounts: &[Mount],
    ) -> BTreeMap<String, Value> {
        let mut v = self.base_vars();
        let mut labels: serde_json::Map<String, Value> = spec
            .labels
            .iter()
            .map(|(k, x)| (k.clone(), json!(x)))
            .collect();
        labels.insert("surplus.instance".into(), json!(id));
        let mut exposed = serde_json::Map::new();
        let mut bindings = serde_json::Map::new();
        for p in &spec.ports {
            let key = format!("{}/{}", p.instance_port, p.protocol.as_str());
            exposed.insert(key.clone(), json!({}));
            let entry = bindings.entry(key).or_insert_with(|| json!([]));
            entry
                .as_array_mut()
                .expect("made as an array")
                .push(json!({ "HostPort": p.host_port.to_string() }));
        }
        v.extend([
            ("id".into(), json!(id)),
            ("native_id".into(), json!(native.unwrap_or(id))),
            ("name".into(), json!(spec.name)),
            ("image".into(), json!(spec.image)),
            (
                "command".into(),
                if spec.command.is_empty() {
                    Value::Null
                } else {
                    json!(spec.command)
                },
            ),
            ("env".into(), json!(spec.env)),
            (
                "env_list".into(),
                json!(
                    spec.env
                        .iter()
                        .map(|(k, x)| format!("{k}={x}"))
                        .collect::<Vec<_>>()
                ),
            ),
            ("labels".into(), Value::Object(labels)),
            ("ports".into(), json!(spec.ports)),
            ("exposed_ports".into(), Value::Object(exposed)),
            ("port_bindings".into(), Value::Object(bindings)),
            (
                "binds".into(),
                json!(
                    mounts
                        .iter()
                        .map(|m| format!("{}:{}", m.native_id, m.attachment.mount_path))
                        .collect::<Vec<_>>()
                ),
            ),
        ]);
        v.extend(limit_vars(&spec.limits));
        v
    }

    /// A lifecycle operation on an instance: its variables plus the grace period.
    async fn lifecycle(
        &self,
        op: &'static str,
        instance: &Instance,
        mounts: &[Mount],
        grace: Duration,
    ) -> Result<(), DriverError> {
        let mut vars = self.instance_vars(
            &instance.id,
            instance.native_id.as_deref(),
            &instance.spec,
            mounts,
        );
        vars.insert("grace_secs".into(), json!(grace.as_secs()));
        self.perform(op, vars, None).await.map(drop)
    }

    fn step_failed(op: &str, n: usize, e: impl std::fmt::Display) -> DriverError {
        DriverError::Failed(format!("{op} step {n}: {e}"))
    }

    /// Runs an operation's steps; returns the last step's answer and the variables as
    /// the steps left them (with what they captured).
    async fn perform(
        &self,
        op: &'static str,
        mut vars: BTreeMap<String, Value>,
        save_to: Option<&Path>,
    ) -> Result<(Answer, BTreeMap<String, Value>), DriverError> {
        let operation = self
            .mapping
            .ops
            .get(op)
            .ok_or_else(|| DriverError::Unsupported {
                driver: self.name(),
                operation: op,
            })?;
        let mut last = Answer {
            status: 0,
            json: Value::Null,
        };
        let mut failure: Option<DriverError> = None;
        for (n, step) in operation.steps.iter().enumerate() {
            if failure.is_some() && !step.always {
                continue;
            }
            let answer = self.step(op, n, step, &vars, save_to).await;
            match answer {
                Ok(answer) => {
                    for (name, pointer) in &step.capture {
                        let value = answer.json.pointer(pointer).cloned().ok_or_else(|| {
                            Self::step_failed(op, n, format!("the answer has nothing at {pointer}"))
                        });
                        match value {
                            Ok(v) => {
                                vars.insert(name.clone(), v);
                            }
                            Err(e) => failure = failure.or(Some(e)),
                        }
                    }
                    last = answer;
                }
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok((last, vars)),
        }
    }

    async fn step(
        &self,
        op: &str,
        n: usize,
        step: &Step,
        vars: &BTreeMap<String, Value>,
        save_to: Option<&Path>,
    ) -> Result<Answer, DriverError> {
        if let Some(program) = &step.program {
            let args = step
                .args
                .iter()
                .map(|a| render(a, vars, Context::Argument))
                .collect::<Result<Vec<_>, _>>()?;
            let output = tokio::time::timeout(
                self.mapping.endpoint.timeout,
                tokio::process::Command::new(program)
                    .args(&args)
                    .env_clear()
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .map_err(|_| Self::step_failed(op, n, "the program did not finish in time"))?
            .map_err(|e| Self::step_failed(op, n, format!("{}: {e}", program.display())))?;
            if !output.status.success() {
                return Err(Self::step_failed(
                    op,
                    n,
                    format!(
                        "{} exited with {}: {}",
                        program.display(),
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    ),
                ));
            }
            let json = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            return Ok(Answer { status: 0, json });
        }
        let method = step.method.as_deref().expect("checked at load");
        let path = render(
            step.path.as_deref().expect("checked at load"),
            vars,
            Context::PathSegment,
        )?;
        let body = match &step.body {
            Some(t) => {
                let text = render(t, vars, Context::Json)?;
                // The rendered body must be JSON: a template cannot produce anything else.
                serde_json::from_str::<Value>(&text).map_err(|e| {
                    Self::step_failed(op, n, format!("body is not JSON after substitution: {e}"))
                })?;
                Some(text)
            }
            None => None,
        };
        let (status, bytes) = tokio::time::timeout(
            self.mapping.endpoint.timeout,
            self.http(method, &path, body, save_to),
        )
        .await
        .map_err(|_| Self::step_failed(op, n, format!("{method} {path}: no answer in time")))?
        .map_err(|e| Self::step_failed(op, n, format!("{method} {path}: {e}")))?;
        let accepted = if step.accept.is_empty() {
            (200..300).contains(&status)
        } else {
            step.accept.contains(&status)
        };
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !accepted {
            let message = json
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(Self::step_failed(
                op,
                n,
                format!("{method} {path} answered {status}: {message}"),
            ));
        }
        Ok(Answer { status, json })
    }

    /// One HTTP/1.1 request on a fresh connection. With `save_to`, a successful
    /// answer's body is streamed to that file and the returned bytes hold its size.
    async fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        save_to: Option<&Path>,
    ) -> Result<(u16, Vec<u8>), String> {
        let endpoint = &self.mapping.endpoint;
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &endpoint.host);
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let response = if let Some(socket) = &endpoint.unix_socket {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| format!("{}: {e}", socket.display()))?;
            send(stream, request).await?
        } else {
            let address = endpoint.address.as_deref().expect("checked at load");
            let stream = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| format!("{address}: {e}"))?;
            send(stream, request).await?
        };
        let status = response.status().as_u16();
        let mut body = response.into_body();
        match save_to.filter(|_| (200..300).contains(&status)) {
            Some(path) => {
                let mut file = tokio::fs::File::create(path)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut size = 0u64;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
                        size += data.len() as u64;
                        file.write_all(&data).await.map_err(|e| e.to_string())?;
                    }
                }
                file.sync_all().await.map_err(|e| e.to_string())?;
                Ok((
                    status,
                    serde_json::to_vec(&json!({ "size_bytes": size })).expect("json"),
                ))
            }
            None => {
                let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok((status, bytes.to_vec()))
            }
        }
    }
}

async fn send<S>(
    stream: S,
    request: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

fn limit_vars(limits: &Limits) -> [(String, Value); 7] {
    let (nano, memory, swap) = super::docker::engine_limits(limits);
    [
        ("millicpus".into(), json!(limits.millicpus.unwrap_or(0))),
        ("nano_cpus".into(), json!(nano)),
        (
            "cpu_quota".into(),
            json!(limits.millicpus.map_or(-1, |m| i64::from(m) * 100)),
        ),
        ("cpu_period".into(), json!(100_000)),
        ("memory_bytes".into(), json!(memory)),
        ("memory_swap".into(), json!(swap)),
        // -1: no limit asked for (the provider's system applies its own default).
        ("pids".into(), json!(limits.pids.map_or(-1, i64::from))),
    ]
}

#[async_trait]
impl Driver for MappedDriver {
    fn name(&self) -> String {
        format!("mapped:{}", self.mapping.name)
    }

    async fn run(&self, id: &str, spec: &RunSpec, mounts: &[Mount]) -> Result<String, DriverError> {
        let mut vars = self.instance_vars(id, None, spec, mounts);
        vars.insert("grace_secs".into(), json!(0));
        // A step may capture `native_id` (a container id, say); otherwise the
        // instance id names it on the provider's side.
        let (_, vars) = self.perform("run", vars, None).await?;
        Ok(vars
            .get("native_id")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or(id)
            .to_owned())
    }

    async fn start(&self, instance: &Instance, mounts: &[Mount]) -> Result<(), DriverError> {
        self.lifecycle("start", instance, mounts, Duration::ZERO)
            .await
    }

    async fn stop(&self, instance: &Instance, grace: Duration) -> Result<(), DriverError> {
        self.lifecycle("stop", instance, &[], grace).await
    }

    async fn reboot(
        &self,
        instance: &Instance,
        mounts: &[Mount],
        grace: Duration,
    ) -> Result<(), DriverError> {
        if !self.mapping.ops.contains_key("reboot") {
            self.stop(instance, grace).await?;
            return self.start(instance, mounts).await;
        }
        self.lifecycle("reboot", instance, mounts, grace).await
    }

    async fn terminate(&self, instance: &Instance, grace: Duration) -> Result<(), DriverError> {
        self.lifecycle("terminate", instance, &[], grace).await
    }

    async fn observe(&self, instance: &Instance) -> Result<Observed, DriverError> {
        let operation =
            self.mapping
                .ops
                .get("inspect")
                .ok_or_else(|| DriverError::Unsupported {
                    driver: self.name(),
                    operation: "inspect",
                })?;
        let read = operation.read.as_ref().expect("checked at load");
        let vars = self.instance_vars(
            &instance.id,
            instance.native_id.as_deref(),
            &instance.spec,
            &[],
        );
        // Gone statuses are answers, not failures: accept them for this step.
        let mut op = operation.clone();
        for step in &mut op.steps {
            if step.accept.is_empty() {
                step.accept = (200..300).collect();
            }
            step.accept.extend(&read.gone_status);
        }
        let mut last = Answer {
            status: 0,
            json: Value::Null,
        };
        for (n, step) in op.steps.iter().enumerate() {
            last = self.step("inspect", n, step, &vars, None).await?;
        }
        if read.gone_status.contains(&last.status) {
            return Ok(Observed {
                gone: true,
                ..Default::default()
            });
        }
        let native = last
            .json
            .pointer(&read.state)
            .and_then(Value::as_str)
            .ok_or_else(|| DriverError::Failed(format!("inspect: no state at {}", read.state)))?;
        let state = read.states.get(native).map(String::as_str);
        let running = state == Some("running");
        let gone = state == Some("gone");
        Ok(Observed {
            gone,
            running,
            exit_code: read
                .exit_code
                .as_ref()
                .and_then(|p| last.json.pointer(p))
                .and_then(Value::as_i64)
                .filter(|_| !running)
                .map(|c| c as i32),
            applied: Limits {
                millicpus: pointer_u64(&last.json, &read.millicpus)
                    .or_else(|| pointer_u64(&last.json, &read.nano_cpus).map(|n| n / 1_000_000))
                    .map(|m| m as u32),
                memory_bytes: pointer_u64(&last.json, &read.memory_bytes),
                pids: pointer_u64(&last.json, &read.pids)
                    .filter(|&p| p > 0)
                    .and_then(|p| u32::try_from(p).ok()),
            },
            processes: None,
        })
    }

    async fn set_limits(&self, instance: &Instance, limits: &Limits) -> Result<(), DriverError> {
        let mut vars = self.instance_vars(
            &instance.id,
            instance.native_id.as_deref(),
            &instance.spec,
            &[],
        );
        vars.extend(limit_vars(limits));
        self.perform("set_limits", vars, None).await.map(drop)
    }

    async fn create_volume(&self, id: &str, size_bytes: u64) -> Result<String, DriverError> {
        let mut vars = self.base_vars();
        vars.insert("volume_id".into(), json!(id));
        vars.insert("size_bytes".into(), json!(size_bytes));
        let (answer, _) = self.perform("volume_create", vars, None).await?;
        Ok(answer
            .json
            .get("Name")
            .or_else(|| answer.json.get("name"))
            .and_then(Value::as_str)
            .map_or_else(|| id.to_owned(), str::to_owned))
    }

    async fn delete_volume(&self, volume: &Volume) -> Result<(), DriverError> {
        let mut vars = self.base_vars();
        vars.insert("volume_id".into(), json!(volume.id));
        vars.insert(
            "volume_native_id".into(),
            json!(volume.native_id.clone().unwrap_or_default()),
        );
        self.perform("volume_delete", vars, None).await.map(drop)
    }

    async fn snapshot(
        &self,
        volume: &Volume,
        snapshot_id: &str,
    ) -> Result<(String, u64), DriverError> {
        let mut vars = self.base_vars();
        vars.insert("volume_id".into(), json!(volume.id));
        vars.insert(
            "volume_native_id".into(),
            json!(volume.native_id.clone().unwrap_or_default()),
        );
        vars.insert("snapshot_id".into(), json!(snapshot_id));
        vars.insert("size_bytes".into(), json!(volume.size_bytes));
        let path = self.snapshots.join(format!("{snapshot_id}.tar"));
        let saves = self
            .mapping
            .ops
            .get("snapshot")
            .is_some_and(|o| o.steps.iter().any(|s| s.save_body));
        let result = self
            .perform("snapshot", vars, saves.then_some(path.as_path()))
            .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok((path.display().to_string(), size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("name".to_owned(), json!("a\"; $(rm -rf /) `x` ../../etc")),
            (
                "labels".to_owned(),
                json!({ "k": "v\"}, \"Privileged\": true, \"x\": \"" }),
            ),
        ])
    }

    #[test]
    fn values_are_json_in_bodies_and_encoded_in_paths() {
        let body = render(
            r#"{"Name": {{name}}, "Labels": {{labels}}}"#,
            &vars(),
            Context::Json,
        )
        .unwrap();
        let parsed: Value = serde_json::from_str(&body).unwrap();
        // The hostile text stays one string; it adds no key.
        assert_eq!(parsed["Name"], json!("a\"; $(rm -rf /) `x` ../../etc"));
        assert_eq!(parsed["Labels"].as_object().unwrap().len(), 1);
        assert!(parsed.get("Privileged").is_none());
        let path = render("/containers/{{name}}/json", &vars(), Context::PathSegment).unwrap();
        assert!(
            !path[12..path.len() - 5].contains(['/', ' ', '"', '$', '`', ';']),
            "{path}"
        );
        assert!(render("/x/{{labels}}", &vars(), Context::PathSegment).is_err());
    }

    #[test]
    fn bad_mappings_are_refused_with_the_place_named() {
        let base = "name = \"t\"\n[endpoint]\naddress = \"127.0.0.1:1\"\n";
        let cases = [
            (
                "[[ops.run.steps]]\nmethod = \"POST\"\npath = \"/x/{{nope}}\"\n",
                "unknown variable",
            ),
            (
                "[[ops.run.steps]]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"{{id}}\"]\n",
                "not in allowed_programs",
            ),
            (
                "[[ops.launch.steps]]\nmethod = \"POST\"\npath = \"/x\"\n",
                "unknown operation",
            ),
            (
                "[[ops.inspect.steps]]\nmethod = \"GET\"\npath = \"/x\"\n",
                "inspect needs it",
            ),
            (
                "[[ops.run.steps]]\nmethod = \"EXEC\"\npath = \"/x\"\n",
                "is not GET",
            ),
        ];
        for (ops, expected) in cases {
            let e = Mapping::parse(&format!("{base}{ops}")).unwrap_err();
            assert!(e.contains(expected), "{e}");
        }
    }

    #[test]
    fn the_shipped_docker_mapping_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/mapped-docker.toml"
        ))
        .unwrap();
        let m = Mapping::parse(&text).unwrap();
        for op in OPERATIONS {
            assert!(m.ops.contains_key(*op), "{op} is mapped");
        }
    }
}
