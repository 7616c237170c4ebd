//! Instance pages: the caller's instances with filters, one instance with what its host
//! reads back, lifecycle buttons, and a form to run a new one. Every action is the
//! API's `POST /v1/control` with a typed [`ControlCall`].

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::Redirect;
use axum::routing::{get, post};
use maud::html;
use surplus_api::control::{
    ControlCall, ControlResponse, InstanceView, parse_attachment, parse_cpus, parse_port,
    parse_size,
};
use surplus_protocol::control::{InstanceState, InstanceStatus, Limits, RunSpec};

use super::view::{action, bytes, cpus, labels, page, time, time_or_dash};
use super::{Filled, FormFields, Page, PageError, Signed};
use crate::app::Controller;
use crate::http::{Caller, control};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/console/instances", get(list).post(run))
        .route("/console/instances/new", get(new_form))
        .route("/console/instances/{id}", get(detail))
        .route("/console/instances/{id}/{op}", post(lifecycle))
        .route("/console/volumes", get(volumes))
        .route("/console/volumes/{id}/snapshot", post(snapshot))
}

/// Takes a snapshot of a volume, then shows the volumes with it.
async fn snapshot(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Redirect, PageError> {
    call(&ctl, caller, ControlCall::CreateSnapshot { volume_id: id }).await?;
    Ok(Redirect::to("/console/volumes"))
}

/// The API's answer to a control call made for the console.
async fn call(
    ctl: &Arc<Controller>,
    caller: Caller,
    c: ControlCall,
) -> Result<ControlResponse, PageError> {
    let body = serde_json::to_value(&c).expect("control calls serialize");
    let axum::Json(answer) =
        control::control(State(ctl.clone()), caller, Ok(axum::Json(body))).await?;
    Ok(answer)
}

fn limits_text(l: &Limits) -> (String, String) {
    (
        l.millicpus.map_or("-".into(), cpus),
        l.memory_bytes.map_or("-".into(), bytes),
    )
}

async fn list(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Page {
    let filled = Filled::of(query.as_deref());
    let axum::Json(answer) =
        control::list_instances(State(ctl.clone()), caller, RawQuery(Some(filled.query()))).await?;
    let ControlResponse::Instances(list) = answer else {
        return Err(PageError::bad_request("unexpected answer"));
    };
    let (state, label) = (filled.get("state"), filled.get("label"));
    Ok(page(
        "Instances",
        &signed,
        html! {
            h1 { "Instances" }
            div.actions { a.button href="/console/instances/new" { "Run an instance…" } }
            form.filters method="get" action="/console/instances" {
                label for="state" { "State" }
                select #state name="state" {
                    option value="" selected[state.is_empty()] { "any" }
                    @for s in InstanceState::ALL { option value=(s.to_string()) selected[state == s.to_string()] { (s.to_string()) } }
                }
                label for="label" { "Label" }
                input #label type="search" name="label" value=(label) placeholder="k=v";
                button type="submit" { "Filter" }
            }
            (instance_table(&list))
        },
    ))
}

fn instance_table(list: &[InstanceView]) -> maud::Markup {
    html! {
        table #instances {
            thead { tr { th { "Instance" } th { "Name" } th { "State" } th { "Image / command" } th { "CPUs" } th { "Memory" } th { "Labels" } th { "Account" } th { "Launched" } } }
            tbody { @for v in list {
                @let i = &v.instance;
                @let (c, m) = limits_text(&i.spec.limits);
                tr data-instance=(i.id) {
                    td { a href={ "/console/instances/" (i.id) } { code { (i.id) } } }
                    td { (i.spec.name.as_deref().unwrap_or("")) }
                    td { span class={ "state " (i.state.to_string()) } { (i.state.to_string()) } @if v.stale { " (stale)" } }
                    td { code { (i.spec.image.clone().unwrap_or_else(|| i.spec.command.join(" "))) } }
                    td.num { (c) } td.num { (m) }
                    td { (labels(&i.spec.labels)) }
                    td { (v.account) }
                    td { (time(i.launched_at_ms)) }
                }
            } }
        }
        @if list.is_empty() { p.empty { "No instance matches." } }
    }
}

async fn detail(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
) -> Page {
    let ControlResponse::Instances(list) = call(
        &ctl,
        caller.clone(),
        ControlCall::DescribeInstances(surplus_protocol::control::Filters {
            ids: vec![id.clone()],
            ..Default::default()
        }),
    )
    .await?
    else {
        return Err(PageError::bad_request("unexpected answer"));
    };
    let Some(v) = list.into_iter().next() else {
        return Err(PageError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("instance {id} not found"),
        ));
    };
    let status: Option<InstanceStatus> = match call(
        &ctl,
        caller,
        ControlCall::DescribeInstanceStatus {
            ids: vec![id.clone()],
        },
    )
    .await
    {
        Ok(ControlResponse::Statuses(s)) => s.into_iter().next(),
        _ => None,
    };
    let i = &v.instance;
    let (c, m) = limits_text(&i.spec.limits);
    let live = !matches!(i.state, InstanceState::Terminated);
    Ok(page(
        &id,
        &signed,
        html! {
            h1 { code { (i.id) } " " span #state class={ "state " (i.state.to_string()) } { (i.state.to_string()) } }
            @if v.stale { p.error { "The host could not be asked: this is the last known record." } }
            @if let Some(why) = &v.host_contradiction { p.error { "The host contradicts the record: " (why) } }
            @if live {
                div.actions {
                    @for (op, label) in [("start", "Start"), ("stop", "Stop"), ("reboot", "Reboot")] {
                        (action(&signed, &format!("/console/instances/{}/{op}", i.id), label, false)) " "
                    }
                    (action(&signed, &format!("/console/instances/{}/terminate", i.id), "Terminate", true))
                }
            }
            dl.facts {
                dt { "Name" } dd { (i.spec.name.as_deref().unwrap_or("-")) }
                dt { "Host" } dd { code { (v.agent_id) } }
                dt { "Account" } dd { (v.account) }
                dt { "Image" } dd { (i.spec.image.as_deref().unwrap_or("-")) }
                dt { "Command" } dd { code { (i.spec.command.join(" ")) } }
                dt { "Limits" } dd { (c) " CPUs, " (m) ", " (i.spec.limits.pids.map_or("host default".into(), |p| p.to_string())) " processes" }
                dt { "Ports" } dd { @for p in &i.spec.ports { code { (p.host_port) " → " (p.instance_port) "/" (p.protocol.as_str()) } " " } }
                dt { "Volumes" } dd { @for a in &i.spec.volumes { code { (a.volume_id) " at " (a.mount_path) } " " } }
                dt { "Labels" } dd { (labels(&i.spec.labels)) }
                dt { "Launched" } dd { (time(i.launched_at_ms)) }
                dt { "Usage" } dd { a href={ "/console/usage?instance=" (i.id) } { "by hour" } " · " a href={ "/console/usage?instance=" (i.id) "&granularity=day" } { "by day" } }
                dt { "State since" } dd { (time_or_dash(Some(i.state_changed_at_ms))) }
                @if let Some(r) = &i.state_reason { dt { "Reason" } dd { (r) } }
            }
            @if let Some(s) = status {
                h2 { "Read back from the host" }
                @let (ac, am) = limits_text(&s.applied);
                dl.facts #host-status {
                    dt { "State" } dd { (s.state.to_string()) }
                    dt { "Limits in force" } dd { (ac) " CPUs, " (am) }
                    dt { "Processes" } dd { (s.processes.map_or("-".into(), |p| p.to_string())) }
                    dt { "Exit code" } dd { (s.exit_code.map_or("-".into(), |c| c.to_string())) }
                }
            }
        },
    ))
}

async fn lifecycle(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path((id, op)): Path<(String, String)>,
) -> Result<Redirect, PageError> {
    let ids = vec![id.clone()];
    let c = match op.as_str() {
        "start" => ControlCall::StartInstances { ids },
        "stop" => ControlCall::StopInstances { ids },
        "reboot" => ControlCall::RebootInstances { ids },
        "terminate" => ControlCall::TerminateInstances { ids },
        other => {
            return Err(PageError::new(
                axum::http::StatusCode::NOT_FOUND,
                format!("no action {other:?} on instances"),
            ));
        }
    };
    call(&ctl, caller, c).await?;
    Ok(Redirect::to(&format!("/console/instances/{id}")))
}

async fn new_form(signed: Signed) -> Page {
    Ok(run_form(&signed, &FormFields::default(), None))
}

fn run_form(signed: &Signed, f: &FormFields, error: Option<&str>) -> maud::Markup {
    let v = |k: &str| f.get(k).unwrap_or("").to_owned();
    page(
        "Run an instance",
        signed,
        html! {
            h1 { "Run an instance" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.stacked method="post" action="/console/instances" {
                input type="hidden" name="csrf" value=(signed.csrf);
                // A second submission of this form (a double click, a reload) starts
                // no second instance.
                input type="hidden" name="client_token" value=(f.get("client_token").map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned));
                label for="name" { "Name" } input #name name="name" value=(v("name"));
                label for="agent" { "Agent id (optional when one host decides)" } input #agent name="agent" value=(v("agent"));
                label for="image" { "Image (container drivers)" } input #image name="image" value=(v("image"));
                label for="command" { "Command, one argument per line" } textarea #command name="command" rows="3" { (v("command")) }
                label for="cpus" { "CPUs" } input #cpus name="cpus" value=(v("cpus")) placeholder="0.5";
                label for="memory" { "Memory" } input #memory name="memory" value=(v("memory")) placeholder="64MiB";
                label for="ports" { "Ports, HOST:INSTANCE[/udp] per line" } textarea #ports name="ports" rows="2" { (v("ports")) }
                label for="labels" { "Labels, key=value per line" } textarea #labels name="labels" rows="2" { (v("labels")) }
                label for="env" { "Environment, KEY=VALUE per line" } textarea #env name="env" rows="2" { (v("env")) }
                label for="volumes" { "Volumes, VOLUME_ID:/path per line" } textarea #volumes name="volumes" rows="2" { (v("volumes")) }
                button type="submit" { "Run" }
            }
        },
    )
}

fn lines(text: Option<&str>) -> impl Iterator<Item = &str> {
    text.unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
}

fn pairs(f: &FormFields, key: &str) -> Result<BTreeMap<String, String>, String> {
    lines(f.get(key))
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| format!("{key}: {l:?} is not key=value"))
        })
        .collect()
}

/// The RunInstances call a filled-in form asks for; the API checks every value.
fn run_call(f: &FormFields) -> Result<ControlCall, String> {
    let millicpus = f
        .non_empty("cpus")
        .map(|c| {
            c.parse::<f64>()
                .map_err(|_| format!("{c:?} is not a number of CPUs"))
                .and_then(parse_cpus)
                .map_err(|e| format!("cpus: {e}"))
        })
        .transpose()?;
    let memory_bytes = f
        .non_empty("memory")
        .map(|m| parse_size(m).map_err(|e| format!("memory: {e}")))
        .transpose()?;
    let ports = lines(f.get("ports"))
        .map(|p| parse_port(p).map_err(|e| format!("ports: {e}")))
        .collect::<Result<_, String>>()?;
    let volumes = lines(f.get("volumes"))
        .map(|v| parse_attachment(v).map_err(|e| format!("volumes: {e}")))
        .collect::<Result<_, String>>()?;
    let agent_id = f
        .non_empty("agent")
        .map(|a| {
            a.parse()
                .map_err(|_| format!("agent: {a:?} is not an agent id"))
        })
        .transpose()?;
    Ok(ControlCall::RunInstances {
        agent_id,
        client_token: f.non_empty("client_token").map(str::to_owned),
        spec: RunSpec {
            name: f.non_empty("name").map(str::to_owned),
            image: f.non_empty("image").map(str::to_owned),
            command: lines(f.get("command")).map(str::to_owned).collect(),
            env: pairs(f, "env")?,
            limits: Limits {
                millicpus,
                memory_bytes,
                pids: None,
            },
            ports,
            labels: pairs(f, "labels")?,
            volumes,
        },
    })
}

async fn run(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    form: FormFields,
) -> Result<axum::response::Response, PageError> {
    use axum::response::IntoResponse;
    let refused = |e: String| {
        (
            axum::http::StatusCode::BAD_REQUEST,
            run_form(&signed, &form, Some(&e)),
        )
            .into_response()
    };
    let c = match run_call(&form) {
        Ok(c) => c,
        Err(e) => return Ok(refused(e)),
    };
    match call(&ctl, caller, c).await {
        Ok(ControlResponse::Instances(list)) => match list.first() {
            Some(v) => {
                Ok(Redirect::to(&format!("/console/instances/{}", v.instance.id)).into_response())
            }
            None => Ok(Redirect::to("/console/instances").into_response()),
        },
        Ok(_) => Ok(Redirect::to("/console/instances").into_response()),
        // The form stays filled in, with the API's reason.
        Err(e) => Ok((e.status, run_form(&signed, &form, Some(&e.message))).into_response()),
    }
}

async fn volumes(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    let axum::Json(answer) = control::list_volumes(State(ctl), caller).await?;
    let ControlResponse::Volumes(list) = answer else {
        return Err(PageError::bad_request("unexpected answer"));
    };
    Ok(page(
        "Volumes",
        &signed,
        html! {
            h1 { "Volumes" }
            table #volumes {
                thead { tr {
                    th { "Volume" } th { "Name" } th { "Size" } th { "State" } th { "Attached to" } th { "Host" }
                    th { "Account" } th { "Created" } th { "Snapshots" } th {}
                } }
                tbody { @for v in &list { tr data-volume=(v.volume.id) {
                    td { code { (v.volume.id) } } td { (v.volume.name.as_deref().unwrap_or("")) }
                    td.num { (bytes(v.volume.size_bytes)) }
                    td { (format!("{:?}", v.volume.state).to_lowercase()) @if v.stale { " (stale)" } }
                    td { @if let Some(i) = &v.volume.attached_to { a href={ "/console/instances/" (i) } { code { (i) } } } @else { "-" } }
                    td { code { (v.agent_id) } } td { (v.account) }
                    td { (time(v.volume.created_at_ms)) }
                    td.snapshots {
                        @if v.snapshots.is_empty() { "-" }
                        @for s in &v.snapshots {
                            div { code { (s.id) } " " (bytes(s.size_bytes)) ", " (time(s.created_at_ms)) }
                        }
                    }
                    td { (action(&signed, &format!("/console/volumes/{}/snapshot", v.volume.id), "Snapshot", false)) }
                } } }
            }
            @if list.is_empty() { p.empty { "No volume. Create one with " code { "surplus volumes create --size 1GiB" } "." } }
        },
    ))
}

#[cfg(test)]
mod tests {
    use surplus_protocol::control::PortProtocol;

    use super::*;

    fn form(pairs: &[(&str, &str)]) -> FormFields {
        FormFields(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_filled_in_form_is_the_call_it_shows() {
        let c = run_call(&form(&[
            ("name", "web"),
            ("command", "/bin/sleep\n600\n"),
            ("cpus", "0.5"),
            ("memory", "64MiB"),
            ("ports", "8080:80\n5353:53/udp"),
            ("labels", "team=red"),
            ("env", ""),
            ("agent", ""),
            ("client_token", "form-1"),
        ]))
        .unwrap();
        let ControlCall::RunInstances {
            agent_id,
            spec,
            client_token,
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(agent_id, None);
        assert_eq!(
            client_token.as_deref(),
            Some("form-1"),
            "a resubmitted form runs once"
        );
        assert_eq!(spec.command, ["/bin/sleep", "600"]);
        assert_eq!(spec.limits.millicpus, Some(500));
        assert_eq!(spec.limits.memory_bytes, Some(64 << 20));
        assert_eq!(spec.ports[1].protocol, PortProtocol::Udp);
        assert_eq!(spec.labels["team"], "red");
        assert!(spec.env.is_empty());
        for (field, bad) in [
            ("cpus", "lots"),
            ("memory", "5 parsecs"),
            ("ports", "80"),
            ("labels", "nokey"),
            ("agent", "x"),
        ] {
            let e = run_call(&form(&[(field, bad)])).unwrap_err();
            assert!(e.starts_with(field), "{field}: {e}");
        }
    }
}
