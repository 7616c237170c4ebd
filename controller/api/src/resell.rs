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
    /// Most hosts it may have listed at once.
    pub max_hosts: u32,
}
