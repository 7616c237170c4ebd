//! Providers of capacity and their agreements: the resell pipeline's policy.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub use surplus_market::catalog::{Categories, Category};
pub use surplus_market::resell::{
    Agreement, ClaimedOs, Platforms, PricingMode, Provider, ResourceKind,
};

/// `PUT /v1/providers/{account}`: a provider's profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProviderRequest {
    /// Its name for people.
    pub name: String,
    /// Who to contact.
    pub contact: String,
    /// Its data centers (availability zones).
    #[serde(default)]
    pub zones: Vec<String>,
    /// On the accepted-providers list.
    #[serde(default)]
    pub accepted: bool,
}

/// `POST /v1/agreements`: a business agreement with a provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AgreementRequest {
    /// The provider's account (a provider recorded with `PUT /v1/providers/{account}`).
    pub provider: String,
    /// In force from, Unix ms (default: now).
    #[serde(default)]
    pub valid_from_ms: Option<i64>,
    /// In force until, Unix ms (exclusive).
    pub valid_until_ms: i64,
    /// The kinds of capacity it may resell.
    pub resource_kinds: BTreeSet<ResourceKind>,
    /// The pricing modes it may use.
    pub pricing_modes: BTreeSet<PricingMode>,
    /// The marketplace's commission, basis points.
    pub commission_bps: u32,
    /// Most hosts it may have offered at once.
    pub max_hosts: u32,
    /// Most CPU threads it may have offered at once, as claimed (absent: no limit).
    #[serde(default)]
    pub max_cpus: Option<u32>,
}

pub use surplus_market::listings::{Listing, ListingQuery, ListingSort};
pub use surplus_market::pipeline::{HostProgress, Pipeline, Stage, Step};
pub use surplus_market::quality::Rating;
pub use surplus_market::resell::{Assessment, Criterion, FieldError, ResellRequest};

/// `POST /v1/ratings`: a client's rating of the provider that ran its instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RatingRequest {
    /// The instance whose use is rated.
    pub instance: String,
    /// 1 to 5.
    pub score: u8,
    /// What the client says (at most 1000 characters).
    #[serde(default)]
    pub comment: String,
}

/// A resell request as the API shows it: the document as submitted and where its
/// pipeline is, step by step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResellView {
    /// The request.
    pub id: uuid::Uuid,
    /// The provider's account.
    pub provider: String,
    /// Where it is.
    pub stage: Stage,
    /// Its pipeline: every host's progress and assessment, the reasons of a
    /// rejection, every step with its time.
    pub pipeline: Pipeline,
    /// The listings it made.
    pub listings: Vec<String>,
    /// The document as submitted.
    pub document: ResellRequest,
    /// When it was submitted, Unix ms.
    pub created_at_ms: i64,
    /// When it last moved, Unix ms.
    pub updated_at_ms: i64,
}

/// One host's validation evidence behind a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostEvidence {
    /// The host's agent.
    pub host: uuid::Uuid,
    /// The validation run it was judged by.
    pub run: Option<uuid::Uuid>,
    /// Every acceptance criterion with claimed, measured and required values.
    pub assessment: Option<Assessment>,
}

/// `GET /v1/listings/{id}`: a listing with the validation evidence of its hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListingView {
    /// The listing.
    pub listing: Listing,
    /// Each host's evidence.
    pub evidence: Vec<HostEvidence>,
}

/// A notification to the caller, from the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NotificationView {
    /// Its key (one notification per key).
    pub key: String,
    /// What it says (`resell.accepted`, `resell.rejected`, ...).
    pub kind: String,
    /// Its details.
    pub body: serde_json::Value,
    /// When it was queued, Unix ms.
    pub created_at_ms: i64,
    /// When it was delivered to the account's webhook, once it was.
    pub delivered_at_ms: Option<i64>,
    /// Every attempt to deliver it to the account's webhook.
    pub attempts: Vec<surplus_market::outbox::DeliveryAttempt>,
    /// When it is tried again, if it is.
    pub next_attempt_at_ms: Option<i64>,
}

/// `GET|PUT /v1/webhook`: where the caller's notifications are POSTed (none: `null`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// An http or https URL.
    pub url: Option<String>,
}
