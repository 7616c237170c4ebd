//! The API's reference, rendered on the server from the same OpenAPI document that
//! `GET /openapi.json` serves: every operation by tag with its parameters, body and
//! answers, then every schema with its fields. No script and no assets beyond the
//! console's stylesheet (the page is readable under the console's strict CSP).

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use maud::{Markup, html};
use serde_json::Value;

use super::view::page;
use super::{Page, Signed};
use crate::app::Controller;

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new().route("/console/api", get(reference))
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn reference(signed: Signed) -> Page {
    let doc = serde_json::to_value(crate::http::openapi::document())
        .expect("the OpenAPI document serializes");
    Ok(render(&doc, &signed))
}

fn render(doc: &Value, signed: &Signed) -> Markup {
    let tags = doc["tags"].as_array().cloned().unwrap_or_default();
    let operations = operations(doc);
    let schemas = doc["components"]["schemas"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    page(
        "API reference",
        signed,
        html! {
            h1 { (text(&doc["info"]["title"])) " " span.summary { "version " (text(&doc["info"]["version"])) } }
            p { (prose(&doc["info"]["description"])) }
            p.summary {
                (operations.len()) " operations, " (schemas.len()) " schemas. The same document as JSON: "
                a href="/openapi.json" { code { "/openapi.json" } } " (OpenAPI " (text(&doc["openapi"])) ")."
            }
            nav.toc {
                @for tag in &tags {
                    a href={ "#tag-" (text(&tag["name"])) } { (text(&tag["name"])) } " "
                }
                a href="#schemas" { "schemas" }
            }
            @for tag in &tags {
                @let name = text(&tag["name"]);
                h2 id={ "tag-" (name) } { (name) " " span.summary { (text(&tag["description"])) } }
                @for (method, path, op) in operations.iter().filter(|(_, _, op)| has_tag(op, &name)) {
                    (operation(method, path, op))
                }
            }
            h2 #schemas { "Schemas" }
            @for (name, schema) in &schemas {
                (schema_section(name, schema))
            }
        },
    )
}

/// Every operation: (method, path, operation), in the document's order.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

fn has_tag(op: &Value, tag: &str) -> bool {
    op["tags"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == tag))
}

/// A description of the document (CommonMark): its `code` spans as code, the rest as
/// text.
fn prose(v: &Value) -> Markup {
    let t = text(v);
    html! {
        @for (i, part) in t.split('`').enumerate() {
            @if i % 2 == 1 { code { (part) } } @else { (part) }
        }
    }
}

/// A string of the document, empty when absent.
fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn operation(method: &str, path: &str, op: &Value) -> Markup {
    let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    let body = &op["requestBody"];
    html! {
        section.operation id={ "op-" (text(&op["operationId"])) } {
            h3 {
                span.method { (method) } " " code { (path) } " "
                @if secured { span.chip { "bearer token" } } @else { span.chip { "public" } }
            }
            @if op["summary"].is_string() { p { (prose(&op["summary"])) } }
            @if op["description"].is_string() && op["description"] != op["summary"] { p.summary { (prose(&op["description"])) } }
            @if !params.is_empty() {
                table.params {
                    thead { tr { th { "Parameter" } th { "In" } th { "Type" } th { "Required" } th { "Meaning" } } }
                    tbody { @for p in &params { tr {
                        td { code { (text(&p["name"])) } } td { (text(&p["in"])) }
                        td { (type_of(&p["schema"])) }
                        td { (if p["required"] == true { "yes" } else { "no" }) }
                        td { (prose(&p["description"])) }
                    } } }
                }
            }
            @if body.is_object() {
                p { "Body: " (content_type(&body["content"])) @if body["required"] == true { " (required)" } " " span.summary { (text(&body["description"])) } }
            }
            table.responses {
                thead { tr { th { "Answer" } th { "Meaning" } th { "Body" } } }
                tbody { @for (status, r) in op["responses"].as_object().into_iter().flatten() { tr {
                    td { code { (status) } } td { (prose(&r["description"])) } td { (content_type(&r["content"])) }
                } } }
            }
        }
    }
}

/// `application/json`: the type of its schema.
fn content_type(content: &Value) -> Markup {
    html! {
        @for (media, c) in content.as_object().into_iter().flatten() {
            @if c["schema"].is_null() { code { (media) } } @else { (type_of(&c["schema"])) }
        }
    }
}

/// A schema as a short type: a link to a named schema, `array of X`, `string or
/// null`, `one of X, Y`.
fn type_of(schema: &Value) -> Markup {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        return html! { a href={ "#schema-" (name) } { (name) } };
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema[key].as_array() {
            return html! {
                @for (i, o) in options.iter().enumerate() { @if i > 0 { " or " } (type_of(o)) }
            };
        }
    }
    if let Some(values) = schema["enum"].as_array() {
        return html! {
            "one of "
            @for (i, v) in values.iter().enumerate() { @if i > 0 { ", " } code { (v) } }
        };
    }
    let types: Vec<String> = match &schema["type"] {
        Value::String(t) => vec![t.clone()],
        Value::Array(ts) => ts.iter().map(text).collect(),
        _ => Vec::new(),
    };
    html! {
        @for (i, t) in types.iter().enumerate() {
            @if i > 0 { " or " }
            @match t.as_str() {
                "array" => { "array of " (type_of(&schema["items"])) }
                "object" if schema["additionalProperties"].is_object() => { "map of " (type_of(&schema["additionalProperties"])) }
                other => { (other) @if let Some(f) = schema["format"].as_str() { " (" (f) ")" } }
            }
        }
        @if types.is_empty() { "any" }
    }
}

fn schema_section(name: &str, schema: &Value) -> Markup {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    html! {
        section.schema id={ "schema-" (name) } {
            h3 { code { (name) } }
            @if schema["description"].is_string() { p { (prose(&schema["description"])) } }
            @if let Some(props) = schema["properties"].as_object() {
                table.fields {
                    thead { tr { th { "Field" } th { "Type" } th { "Required" } th { "Meaning" } } }
                    tbody { @for (field, s) in props { tr {
                        td { code { (field) } } td { (type_of(s)) }
                        td { (if required.contains(&field.as_str()) { "yes" } else { "no" }) }
                        td { (prose(&s["description"])) }
                    } } }
                }
            } @else {
                p { (type_of(schema)) }
            }
            @for key in ["oneOf", "allOf"] {
                @if let Some(parts) = schema[key].as_array() {
                    @if parts.iter().any(|p| p["properties"].is_object()) {
                        ul { @for p in parts { li {
                            @if let Some(d) = p["description"].as_str() { (d) ": " }
                            @if let Some(props) = p["properties"].as_object() {
                                @for (i, (field, s)) in props.iter().enumerate() {
                                    @if i > 0 { ", " } code { (field) } " " span.summary { (type_of(s)) }
                                }
                            } @else { (type_of(p)) }
                        } } }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Principal;
    use surplus_market::records::Role;

    #[test]
    fn every_operation_and_schema_has_its_section() {
        let doc = serde_json::to_value(crate::http::openapi::document()).unwrap();
        let signed = Signed {
            principal: Principal {
                account: "ops".into(),
                role: Role::Admin,
            },
            csrf: "x".into(),
        };
        let html = render(&doc, &signed).into_string();
        for (method, path, _) in crate::http::routes() {
            assert!(
                html.contains(&format!(
                    "<span class=\"method\">{method}</span> <code>{path}</code>"
                )),
                "{method} {path} is missing from the reference"
            );
        }
        for name in doc["components"]["schemas"].as_object().unwrap().keys() {
            assert!(html.contains(&format!("id=\"schema-{name}\"")), "{name}");
        }
        // Links to schemas land on their sections.
        assert!(html.contains("href=\"#schema-AgentView\""), "{html}");
        assert!(html.contains("href=\"#schema-ErrorBody\""));
    }
}
