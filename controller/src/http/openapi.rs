//! The API's OpenAPI 3.1 description, served at `GET /openapi.json` and rendered by
//! the console's docs page.
//!
//! Each handler carries its own `#[utoipa::path]` (method, path, parameters, request
//! and success bodies); the schemas are derived from the `surplus-api` types the
//! handlers take and give. What every route shares is added here from the route table
//! itself: the bearer scheme on the routes that need a token, and the error body on
//! every refusal. A test compares the document's routes with the router's, so a route
//! without a description fails.

use std::sync::OnceLock;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::*;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Surplus controller API",
        description = "Agents, validation, control of instances, metering, billing and the ledger. \
            Every answer is JSON; every refusal is an `ErrorBody` whose `error` names the reason. \
            Authenticate with `Authorization: Bearer <API token>` (`surplus-controller api-token`)."
    ),
    paths(
        super::health,
        super::metrics,
        openapi_json,
        agents::list_agents,
        agents::show_agent,
        agents::inventory_history,
        agents::revoke_agent,
        agents::ping_agent,
        agents::create_token,
        agents::create_api_token,
        validation::order_validation,
        validation::agent_validations,
        validation::show_validation,
        validation::cancel_validation,
        control::control,
        control::list_instances,
        control::instance_logs,
        control::list_volumes,
        control::agent_compat,
        billing::get_metering,
        billing::put_metering,
        billing::put_price_plan,
        billing::usage,
        billing::billing_run,
        billing::payment,
        billing::payout,
        billing::put_account,
        billing::balances,
        billing::invoices,
        billing::invoice,
        billing::statements,
        resell::list_providers,
        resell::show_provider,
        resell::put_provider,
        resell::list_agreements,
        resell::create_agreement,
        resell::end_agreement,
        resell::get_platforms,
        resell::put_platforms,
        resell::get_categories,
        resell::submit_request,
        resell::list_requests,
        resell::show_request,
        resell::search_listings,
        resell::show_listing,
        resell::notifications,
        resell::retest_listing,
        resell::rate,
        resell::list_ratings,
        resell::get_webhook,
        resell::put_webhook,
        resell::put_categories,
        market::search_offers,
        market::create_quote,
        market::reserve,
        market::list_reservations,
        market::show_reservation,
        market::release,
        market::reclaim,
        market::pricing_history,
        market::place_bid,
        market::list_bids,
        market::show_bid,
        market::cancel_bid,
        market::show_spot,
        market::clear_spot,
        market::create_auction,
        market::list_auctions,
        market::show_auction,
        market::bid_auction,
        pools::create_pool,
        pools::list_pools,
        pools::show_pool,
        pools::set_pool_policy,
        pools::add_pool_slot,
        pools::remove_pool_slot,
        pools::put_pool_member,
        pools::remove_pool_member,
        pools::credit_pool_member,
        pools::place_pool_request,
        pools::list_pool_requests,
        pools::pool_usage,
        pools::cycle_pool,
        pools::grant_pool_account,
        pools::show_pool_request,
        pools::rebid_pool_request,
        pools::cancel_pool_request,
        pools::explain_pool_request,
        pools::dissolve_pool,
        pools::invite_pool_entity,
        pools::join_pool,
        pools::set_pool_limits,
        pools::leave_pool,
        brokerage::list_peers,
        brokerage::brokerage_usage,
        brokerage::brokerage_margins,
        brokerage::plan_bundle,
        brokerage::post_bills,
        brokerage::create_tender,
        brokerage::list_tenders,
        brokerage::list_bundles,
        brokerage::get_tender_terms,
        brokerage::put_tender_terms,
        brokerage::create_subscription,
        brokerage::list_subscriptions,
        brokerage::show_subscriptions,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Shared),
    tags(
        (name = "operations", description = "Health, metrics and this description"),
        (name = "agents", description = "Agents, join tokens and API tokens"),
        (name = "validation", description = "Benchmark and security validation runs"),
        (name = "control", description = "Instances and volumes on the hosts"),
        (name = "billing", description = "Metering, usage, invoices, statements and the ledger"),
        (name = "resell", description = "Providers of capacity and their agreements"),
        (name = "market", description = "Offers, quotes, reservations and the pricing history"),
        (name = "pools", description = "Private pools: slots, members, requests, bursts"),
        (name = "brokerage", description = "Federation with other controllers and the brokerage of unused subscriptions"),
    )
)]
struct ApiDoc;

/// The name of the bearer scheme in the document.
const BEARER: &str = "bearer";

/// What every operation shares, taken from the route table.
struct Shared;

impl Modify for Shared {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let error = |description: &str| -> RefOr<Response> {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
                .into()
        };
        for (method, path, access) in super::routes() {
            let Some(op) = doc
                .paths
                .paths
                .get_mut(path)
                .and_then(|item| operation(item, method))
            else {
                // Left out of the document: the route-set test names it.
                continue;
            };
            let responses = &mut op.responses.responses;
            if access == Access::Token {
                op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                responses.insert(
                    "401".into(),
                    error("No, an unknown or a revoked API token (`unauthorized`)"),
                );
                responses.insert(
                    "403".into(),
                    error("The token's role or account may not do this (`forbidden`)"),
                );
            }
            responses.insert(
                "4XX".into(),
                error("Refused; `error` names why (`bad_request` with `field`, `not_found`, `conflict`, `payload_too_large`, ...)"),
            );
            responses.insert(
                "5XX".into(),
                error("The controller or the agent failed (`internal`, `agent_offline`, `agent_timeout`, ...)"),
            );
        }
    }
}

fn operation<'a>(
    item: &'a mut utoipa::openapi::PathItem,
    method: &str,
) -> Option<&'a mut utoipa::openapi::path::Operation> {
    match method {
        "GET" => item.get.as_mut(),
        "POST" => item.post.as_mut(),
        "PUT" => item.put.as_mut(),
        "DELETE" => item.delete.as_mut(),
        _ => None,
    }
}

/// The document.
pub(crate) fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").into();
        doc
    })
}

/// This description (OpenAPI 3.1, JSON).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub(super) async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn documented() -> BTreeSet<(String, String)> {
        let doc = serde_json::to_value(document()).unwrap();
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    out.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_described_and_nothing_else() {
        let served: BTreeSet<(String, String)> = super::super::routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_owned(), p.to_owned()))
            .collect();
        let documented = documented();
        let missing: Vec<_> = served.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "routes without a description (add #[utoipa::path] and list them in ApiDoc): {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "described routes the router does not serve: {extra:?}"
        );
    }

    #[test]
    fn token_routes_need_the_bearer_scheme_and_every_refusal_has_the_error_body() {
        let doc = serde_json::to_value(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        for (method, path, access) in super::super::routes() {
            let op = &doc["paths"][path][method.to_lowercase()];
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            assert_eq!(secured, access == Access::Token, "{method} {path}");
            assert_eq!(
                op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
            let success = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| k.starts_with('2'))
                .count();
            assert_eq!(success, 1, "{method} {path}: one success answer");
        }
    }

    #[test]
    fn every_schema_reference_resolves() {
        let doc = serde_json::to_value(document()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(refs.len() > 30, "the document references its schemas");
        for r in refs {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {r}"));
            assert!(schemas.contains_key(name), "{r} is not in components");
        }
    }

    fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => collect_refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }
}
