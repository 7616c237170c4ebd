//! A provider's resell request (C2, source 000 FIG. 2) and the preliminary criteria it
//! must meet before its hosts are tested.
//!
//! Pure: the document, the agreement, the platforms the marketplace supports and the
//! time go in; every problem comes out at once, each with the field it is about (for
//! the document) or the rule it breaks (for the criteria). Nothing here reads storage
//! or the clock; the pipeline that stores requests and orders validation runs calls in
//! here.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use surplus_protocol::Inventory;
use surplus_protocol::bench::BenchReport;
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::control::{CompatLevel, CompatReport};
use surplus_protocol::security::{CheckStatus, SecurityReport, Severity};
use uuid::Uuid;

use crate::acceptance::{Spec, Tolerances, compare};
use crate::catalog::{Categories, Measured};
use crate::records::name_of;

/// What kind of capacity a resource set offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// Instances on hosts.
    Compute,
    /// Volumes.
    Storage,
    /// Network transfer.
    Bandwidth,
}

/// How capacity may be sold (C5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PricingMode {
    /// A price that moves with supply and demand; clients bid a maximum.
    Spot,
    /// Auctions (ascending, descending, sealed).
    Auction,
    /// A price quoted for a short validity.
    Immediate,
    /// A fixed hourly price.
    OnDemand,
    /// Long-term reservation: upfront plus hourly.
    Reserved,
}

/// Whether and how a client's use of the capacity may be interrupted (C6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Interruptibility {
    /// The marketplace chooses.
    DontCare,
    /// A higher bid or a spot price above the client's maximum interrupts.
    PriceBased,
    /// The provider takes capacity back for its own customers.
    FulfilmentBased,
    /// Never interrupted.
    NoInterruptions,
}

/// What the provider wants the marketplace to optimise for (C7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// No preference.
    None,
    /// The most money.
    MaximiseRevenue,
    /// The most hours sold over the long term.
    MaximiseUtilisation,
    /// The capacity must come back at short notice.
    CapacityBackAtShortNotice,
}

/// How much of the marketplace's control interface the provider says its hosts
/// support.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", tag = "level")]
pub enum ClaimedCompatibility {
    /// Every operation.
    Full,
    /// These operations (`run`, `stop`, ...).
    Partial {
        /// The operations.
        operations: Vec<String>,
    },
    /// Another specification, named.
    Other {
        /// Its name.
        specification: String,
    },
    /// No control interface: the client gets the bare machine.
    BareMetal,
}

/// A benchmark figure a provider claims.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClaimedFigure {
    /// The benchmark's id in the agent's suite (`cpu.sha256.multi`, `memory.triad`).
    pub id: String,
    /// The figure.
    pub value: f64,
    /// Its unit (`MB/s`, `Mops/s`, ...).
    pub unit: String,
}

/// The operating system a provider claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClaimedOs {
    /// `debian`, `ubuntu`, `rhel`, ...
    pub family: String,
    /// `12`, `22.04`, ...
    pub version: String,
}

/// The system specification a provider claims for every host of a resource set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct ClaimedSystem {
    /// Hardware vendor.
    pub vendor: Option<String>,
    /// Hardware model.
    pub model: Option<String>,
    /// CPU vendor (`GenuineIntel`, `AuthenticAMD`, `ARM`, ...).
    pub cpu_vendor: Option<String>,
    /// Architecture (`x86_64`, `aarch64`).
    pub architecture: Option<String>,
    /// `bare_metal`, `kvm`, `xen`, ...
    pub virtualization: Option<String>,
    /// CPU sockets.
    pub sockets: Option<u32>,
    /// Physical cores.
    pub cores: Option<u32>,
    /// Hardware threads (logical CPUs).
    pub threads: Option<u32>,
    /// Clock, MHz.
    pub clock_mhz: Option<u32>,
    /// Memory, bytes.
    pub memory_bytes: Option<u64>,
    /// Disk capacity, bytes.
    pub disk_bytes: Option<u64>,
    /// GPUs.
    pub gpus: Option<u32>,
    /// The operating system.
    pub os: Option<ClaimedOs>,
    /// Kernel release (`6.1.0`).
    pub kernel: Option<String>,
    /// Software installed for clients (`docker 24`, `cuda 12.2`).
    pub software: Vec<String>,
    /// Performance claims.
    pub benchmarks: Vec<ClaimedFigure>,
}

/// One set of like hosts a provider offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResourceSet {
    /// What it offers.
    pub kind: ResourceKind,
    /// The provider's data center the hosts are in (an availability zone to clients).
    pub zone: String,
    /// The enrolled agents of the hosts (their access coordinates).
    pub hosts: Vec<Uuid>,
    /// What every host is, as claimed.
    pub system: ClaimedSystem,
    /// How much of the control interface the hosts support, as claimed.
    pub compatibility: ClaimedCompatibility,
}

/// The provider's prices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// The modes the provider accepts.
    pub modes: Vec<PricingMode>,
    /// ISO 4217 code (`EUR`).
    pub currency: String,
    /// The least it sells an hour of one host for, minor units.
    pub minimum_price: u64,
    /// What it sells an hour for at once, minor units (at least the minimum).
    pub immediate_price: Option<u64>,
}

/// A resell request (FIG. 2): what a provider offers and on which terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResellRequest {
    /// Who to contact about this request.
    pub contact: String,
    /// The resource sets.
    pub resource_sets: Vec<ResourceSet>,
    /// Prices.
    pub pricing: Pricing,
    /// Interruptibility the provider accepts.
    pub interruptibility: Interruptibility,
    /// What to optimise for.
    pub goal: Goal,
    /// Features beyond the basics (`gpu-passthrough`, `nested-virtualization`).
    #[serde(default)]
    pub advanced_features: Vec<String>,
    /// Where the provider's own monitoring can be read, if anywhere (a URL).
    #[serde(default)]
    pub monitoring: Option<String>,
    /// The grace the provider promises before an interruption stops a client's
    /// instances, ms: a notice's grace is never shorter (nor shorter than the
    /// marketplace's default).
    #[serde(default)]
    pub grace_ms: Option<i64>,
}

/// A problem with a field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FieldError {
    /// The field, as a path (`resource_sets[0].system.cores`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn name_ok(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Every problem of `request` that can be seen without the marketplace's state, each
/// with its field; empty when the document is well formed. Nothing is stored from a
/// document with problems.
pub fn validate(request: &ResellRequest) -> Vec<FieldError> {
    let mut out = Vec::new();
    let mut err = |field: String, message: String| out.push(FieldError { field, message });
    if request.contact.trim().is_empty() || request.contact.len() > 256 {
        err(
            "contact".into(),
            "a contact of 1 to 256 characters is needed".into(),
        );
    }
    if request.resource_sets.is_empty() {
        err(
            "resource_sets".into(),
            "at least one resource set is needed".into(),
        );
    }
    let mut seen_hosts = BTreeSet::new();
    for (i, set) in request.resource_sets.iter().enumerate() {
        let at = |f: &str| format!("resource_sets[{i}].{f}");
        if !name_ok(&set.zone) {
            err(
                at("zone"),
                format!(
                    "{:?} is not 1 to 64 letters, digits, '-', '_' or '.'",
                    set.zone
                ),
            );
        }
        if set.hosts.is_empty() {
            err(
                at("hosts"),
                "at least one host (an enrolled agent's id) is needed".into(),
            );
        }
        for (j, host) in set.hosts.iter().enumerate() {
            if !seen_hosts.insert(*host) {
                err(
                    format!("resource_sets[{i}].hosts[{j}]"),
                    format!("host {host} is named more than once in the request"),
                );
            }
        }
        let s = &set.system;
        let positive = |v: Option<u32>| v.is_none_or(|n| n > 0);
        for (field, v) in [
            ("sockets", s.sockets),
            ("cores", s.cores),
            ("threads", s.threads),
            ("clock_mhz", s.clock_mhz),
        ] {
            if !positive(v) {
                err(at(&format!("system.{field}")), "must be at least 1".into());
            }
        }
        if s.memory_bytes == Some(0) {
            err(at("system.memory_bytes"), "must be at least 1".into());
        }
        if let (Some(cores), Some(threads)) = (s.cores, s.threads) {
            if threads < cores {
                err(
                    at("system.threads"),
                    format!("{threads} threads is fewer than the {cores} cores claimed"),
                );
            }
        }
        if let (Some(sockets), Some(cores)) = (s.sockets, s.cores) {
            if cores < sockets {
                err(
                    at("system.cores"),
                    format!("{cores} cores is fewer than the {sockets} sockets claimed"),
                );
            }
        }
        if set.kind == ResourceKind::Compute && s.threads.is_none() && s.cores.is_none() {
            err(
                at("system.threads"),
                "compute capacity claims its cores or threads".into(),
            );
        }
        if let Some(os) = &s.os {
            if os.family.trim().is_empty() {
                err(at("system.os.family"), "an OS family is needed".into());
            }
            if parse_version(&os.version).is_none() {
                err(
                    at("system.os.version"),
                    format!("{:?} is not a version like 12 or 22.04", os.version),
                );
            }
        }
        if let Some(kernel) = &s.kernel {
            if parse_version(kernel).is_none() {
                err(
                    at("system.kernel"),
                    format!("{kernel:?} is not a kernel release like 6.1.0"),
                );
            }
        }
        let mut ids = BTreeSet::new();
        for (j, b) in s.benchmarks.iter().enumerate() {
            let f = |g: &str| format!("resource_sets[{i}].system.benchmarks[{j}].{g}");
            if !name_ok(&b.id) {
                err(f("id"), format!("{:?} is not a benchmark id", b.id));
            } else if !ids.insert(b.id.as_str()) {
                err(f("id"), format!("{} is claimed twice", b.id));
            }
            if !(b.value.is_finite() && b.value > 0.0) {
                err(f("value"), format!("{} is not a positive number", b.value));
            }
            if b.unit.trim().is_empty() {
                err(f("unit"), "a unit is needed (MB/s, Mops/s, ...)".into());
            }
        }
        if let ClaimedCompatibility::Partial { operations } = &set.compatibility {
            if operations.is_empty() {
                err(
                    at("compatibility.operations"),
                    "a partial claim names at least one operation".into(),
                );
            }
        }
    }
    let p = &request.pricing;
    if p.modes.is_empty() {
        err(
            "pricing.modes".into(),
            "at least one pricing mode is needed".into(),
        );
    }
    let distinct: BTreeSet<_> = p.modes.iter().collect();
    if distinct.len() != p.modes.len() {
        err(
            "pricing.modes".into(),
            "a mode is named more than once".into(),
        );
    }
    if !(p.currency.len() == 3 && p.currency.bytes().all(|b| b.is_ascii_uppercase())) {
        err(
            "pricing.currency".into(),
            format!("{:?} is not an ISO 4217 code like EUR", p.currency),
        );
    }
    if let Some(immediate) = p.immediate_price {
        if immediate < p.minimum_price {
            err(
                "pricing.immediate_price".into(),
                format!("{immediate} is below the minimum price {}", p.minimum_price),
            );
        }
    }
    if p.modes.contains(&PricingMode::Immediate) && p.immediate_price.is_none() {
        err(
            "pricing.immediate_price".into(),
            "the immediate mode needs an immediate price".into(),
        );
    }
    if let Some(g) = request.grace_ms {
        if let Err(refusal) = crate::interrupt::check_listing_grace(g) {
            err("grace_ms".into(), refusal.message);
        }
    }
    if let Some(m) = &request.monitoring {
        if !(m.starts_with("https://") || m.starts_with("http://")) {
            err("monitoring".into(), format!("{m:?} is not an http(s) URL"));
        }
    }
    out
}

/// `22.04.3` as numbers; `None` when it is not dotted numbers (a suffix after `-` or
/// `+` is ignored: `6.1.0-18-amd64` is 6.1.0).
pub fn parse_version(text: &str) -> Option<Vec<u64>> {
    let core = text.split(['-', '+', '~']).next()?.trim();
    if core.is_empty() {
        return None;
    }
    core.split('.').map(|p| p.parse().ok()).collect()
}

/// `a >= b` as versions (missing parts count as 0: 12 equals 12.0).
fn version_at_least(a: &[u64], b: &[u64]) -> bool {
    let n = a.len().max(b.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    (0..n)
        .map(|i| at(a, i).cmp(&at(b, i)))
        .find(|o| o.is_ne())
        .is_none_or(|o| o.is_gt())
}

/// A provider's business agreement with the marketplace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Agreement {
    /// `agr-` and 16 hex digits.
    pub id: String,
    /// The provider's account.
    pub provider: String,
    /// In force from.
    pub valid_from_ms: UnixMillis,
    /// In force until (exclusive).
    pub valid_until_ms: UnixMillis,
    /// The kinds of capacity it may resell.
    pub resource_kinds: BTreeSet<ResourceKind>,
    /// The pricing modes it may use.
    pub pricing_modes: BTreeSet<PricingMode>,
    /// The marketplace's commission, basis points (used by billing).
    pub commission_bps: u32,
    /// Most hosts it may have offered at once (in requests being validated and in
    /// listings).
    pub max_hosts: u32,
    /// Most CPU threads it may have offered at once, counted as claimed (a host's
    /// `threads`, else its `cores`); none: no limit beyond `max_hosts`.
    #[serde(default)]
    pub max_cpus: Option<u32>,
    /// When it was made.
    pub created_at_ms: UnixMillis,
}

impl Agreement {
    /// In force at `now_ms`.
    pub fn in_force(&self, now_ms: UnixMillis) -> bool {
        self.valid_from_ms <= now_ms && now_ms < self.valid_until_ms
    }
}

/// The agreement of `agreements` (one provider's) in force at `now_ms`: the newest when
/// several are. Billing and the preliminary criteria both ask this.
pub fn agreement_in_force(agreements: &[Agreement], now_ms: UnixMillis) -> Option<&Agreement> {
    agreements
        .iter()
        .filter(|a| a.in_force(now_ms))
        .max_by_key(|a| (a.created_at_ms, a.id.clone()))
}

/// A provider of capacity: an account with the `provider` role, and the data centers
/// clients see as its availability zones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Provider {
    /// Its account (what its API tokens and its hosts' `provider` label name).
    pub account: String,
    /// Its name for people.
    pub name: String,
    /// Who to contact.
    pub contact: String,
    /// Its data centers, each an availability zone.
    pub zones: Vec<String>,
    /// On the accepted-providers list.
    pub accepted: bool,
    /// When it was first recorded.
    pub created_at_ms: UnixMillis,
    /// When it last changed.
    pub updated_at_ms: UnixMillis,
}

/// Every problem of a provider's profile, by field.
pub fn validate_provider(p: &Provider) -> Vec<FieldError> {
    let mut out = Vec::new();
    if p.name.trim().is_empty() || p.name.len() > 128 {
        out.push(FieldError {
            field: "name".into(),
            message: "a name of 1 to 128 characters is needed".into(),
        });
    }
    if p.contact.trim().is_empty() || p.contact.len() > 256 {
        out.push(FieldError {
            field: "contact".into(),
            message: "a contact of 1 to 256 characters is needed".into(),
        });
    }
    let mut seen = BTreeSet::new();
    for (i, z) in p.zones.iter().enumerate() {
        if !name_ok(z) {
            out.push(FieldError {
                field: format!("zones[{i}]"),
                message: format!("{z:?} is not 1 to 64 letters, digits, '-', '_' or '.'"),
            });
        } else if !seen.insert(z) {
            out.push(FieldError {
                field: format!("zones[{i}]"),
                message: format!("{z} is given twice"),
            });
        }
    }
    out
}

/// Every problem of an agreement, by field.
pub fn validate_agreement(a: &Agreement) -> Vec<FieldError> {
    let mut out = Vec::new();
    let mut err = |field: &str, message: String| {
        out.push(FieldError {
            field: field.into(),
            message,
        })
    };
    if a.valid_until_ms <= a.valid_from_ms {
        err(
            "valid_until_ms",
            format!(
                "{} is not after valid_from_ms {}",
                a.valid_until_ms, a.valid_from_ms
            ),
        );
    }
    if a.resource_kinds.is_empty() {
        err("resource_kinds", "at least one kind is needed".into());
    }
    if a.pricing_modes.is_empty() {
        err(
            "pricing_modes",
            "at least one pricing mode is needed".into(),
        );
    }
    if a.commission_bps > 10_000 {
        err(
            "commission_bps",
            format!("{} basis points is more than 100%", a.commission_bps),
        );
    }
    if a.max_hosts == 0 {
        err("max_hosts", "must be at least 1".into());
    }
    if a.max_cpus == Some(0) {
        err(
            "max_cpus",
            "must be at least 1 (or absent: no limit)".into(),
        );
    }
    out
}

/// The CPU threads `request` offers as claimed: per host its `threads`, else its
/// `cores`, else none (what counts against an agreement's `max_cpus`).
pub fn claimed_cpus(request: &ResellRequest) -> u32 {
    request
        .resource_sets
        .iter()
        .map(|s| set_cpus(s).saturating_mul(s.hosts.len() as u32))
        .fold(0, u32::saturating_add)
}

/// The CPU threads one host of `set` offers as claimed.
pub fn set_cpus(set: &ResourceSet) -> u32 {
    set.system.threads.or(set.system.cores).unwrap_or(0)
}

/// The platforms the marketplace supports.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Platforms {
    /// CPU vendors.
    pub cpu_vendors: BTreeSet<String>,
    /// Architectures.
    pub architectures: BTreeSet<String>,
    /// Virtualisation types (`bare_metal`, `kvm`, ...).
    pub virtualization: BTreeSet<String>,
    /// OS families with their least version.
    pub os_families: Vec<ClaimedOs>,
    /// The least kernel release.
    pub min_kernel: Option<String>,
}

impl Platforms {
    /// What a new marketplace supports: Intel and AMD x86-64 and 64-bit ARM, bare
    /// metal and the common hypervisors, maintained Debian, Ubuntu and RHEL-family
    /// releases, kernel 5.4 or later.
    pub fn standard() -> Self {
        let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        let os = |family: &str, version: &str| ClaimedOs {
            family: family.into(),
            version: version.into(),
        };
        Self {
            cpu_vendors: set(&["AuthenticAMD", "GenuineIntel", "ARM"]),
            architectures: set(&["x86_64", "aarch64"]),
            virtualization: set(&["bare_metal", "kvm", "xen", "vmware", "hyperv"]),
            os_families: vec![
                os("debian", "11"),
                os("ubuntu", "20.04"),
                os("rhel", "8"),
                os("rocky", "8"),
                os("almalinux", "8"),
            ],
            min_kernel: Some("5.4".into()),
        }
    }

    /// Every problem of the set, by field.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        for (field, set) in [
            ("cpu_vendors", &self.cpu_vendors),
            ("architectures", &self.architectures),
            ("virtualization", &self.virtualization),
        ] {
            if set.iter().any(|v| !name_ok(v)) {
                out.push(FieldError {
                    field: field.into(),
                    message: "every entry is 1 to 64 letters, digits, '-', '_' or '.'".into(),
                });
            }
        }
        let mut families = BTreeSet::new();
        for (i, os) in self.os_families.iter().enumerate() {
            if !name_ok(&os.family) || !families.insert(os.family.as_str()) {
                out.push(FieldError {
                    field: format!("os_families[{i}].family"),
                    message: format!("{:?} is not a family name given once", os.family),
                });
            }
            if parse_version(&os.version).is_none() {
                out.push(FieldError {
                    field: format!("os_families[{i}].version"),
                    message: format!("{:?} is not a version like 12 or 22.04", os.version),
                });
            }
        }
        if let Some(k) = &self.min_kernel {
            if parse_version(k).is_none() {
                out.push(FieldError {
                    field: "min_kernel".into(),
                    message: format!("{k:?} is not a kernel release like 5.10"),
                });
            }
        }
        out
    }
}

/// A preliminary criterion a request does not meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Unmet {
    /// The rule: `provider`, `agreement`, `accepted_provider`, `zone`, `host_taken`,
    /// `platform`, `resource_kind`, `pricing_mode`, `max_hosts` or `max_cpus`.
    pub rule: String,
    /// The field it concerns, when one does.
    pub field: Option<String>,
    /// Why, with the numbers.
    pub message: String,
}

/// What the preliminary criteria look at besides the request.
#[derive(Debug, Clone, Copy)]
pub struct Standing<'a> {
    /// The provider's agreement, if it has one.
    pub agreement: Option<&'a Agreement>,
    /// The provider as recorded (`None`: it is not).
    pub provider: Option<&'a Provider>,
    /// The supported platforms.
    pub platforms: &'a Platforms,
    /// Hosts of the provider held already by its other requests and listings
    /// (listed or not).
    pub listed_hosts: u32,
    /// The CPU threads those hosts were claimed with ([`set_cpus`]).
    pub held_cpus: u32,
    /// Hosts held elsewhere (by a listing, or by another request being validated or
    /// listed), with why: a host is offered once.
    pub taken: &'a BTreeMap<Uuid, String>,
    /// Now.
    pub now_ms: UnixMillis,
}

/// Every preliminary criterion (C2) a well-formed `request` does not meet: an
/// agreement in force, the provider accepted, every claimed platform supported, the
/// resource kinds and pricing modes within the agreement, and within its limits.
/// Empty: its hosts may be tested.
pub fn preliminary(request: &ResellRequest, standing: &Standing<'_>) -> Vec<Unmet> {
    let mut out = Vec::new();
    let mut unmet = |rule: &str, field: Option<String>, message: String| {
        out.push(Unmet {
            rule: rule.into(),
            field,
            message,
        })
    };
    match standing.provider {
        None => unmet(
            "provider",
            None,
            "the provider is not recorded (an admin records it with PUT /v1/providers/{account})"
                .into(),
        ),
        Some(p) if !p.accepted => unmet(
            "accepted_provider",
            None,
            "the provider is not on the accepted-providers list".into(),
        ),
        Some(_) => {}
    }
    match standing.agreement {
        None => unmet("agreement", None, "the provider has no agreement".into()),
        Some(a) if standing.now_ms < a.valid_from_ms => unmet(
            "agreement",
            None,
            format!(
                "the agreement is in force from {} (now {})",
                a.valid_from_ms, standing.now_ms
            ),
        ),
        Some(a) if standing.now_ms >= a.valid_until_ms => unmet(
            "agreement",
            None,
            format!(
                "the agreement ended at {} (now {})",
                a.valid_until_ms, standing.now_ms
            ),
        ),
        Some(_) => {}
    }
    let platforms = standing.platforms;
    for (i, set) in request.resource_sets.iter().enumerate() {
        if let Some(p) = standing.provider {
            if !p.zones.contains(&set.zone) {
                unmet(
                    "zone",
                    Some(format!("resource_sets[{i}].zone")),
                    format!(
                        "{} is not a data center of the provider (its zones: {})",
                        set.zone,
                        if p.zones.is_empty() {
                            "none recorded".to_owned()
                        } else {
                            p.zones.join(", ")
                        }
                    ),
                );
            }
        }
        for (j, host) in set.hosts.iter().enumerate() {
            if let Some(why) = standing.taken.get(host) {
                unmet(
                    "host_taken",
                    Some(format!("resource_sets[{i}].hosts[{j}]")),
                    format!("host {host} is offered already: {why}"),
                );
            }
        }
        let at = |f: &str| Some(format!("resource_sets[{i}].system.{f}"));
        let s = &set.system;
        let mut check = |field: &str, value: &Option<String>, allowed: &BTreeSet<String>| {
            if let Some(v) = value {
                if !allowed.contains(v) {
                    let list: Vec<&str> = allowed.iter().map(String::as_str).collect();
                    unmet(
                        "platform",
                        at(field),
                        format!("{v} is not supported (supported: {})", list.join(", ")),
                    );
                }
            }
        };
        check("cpu_vendor", &s.cpu_vendor, &platforms.cpu_vendors);
        check("architecture", &s.architecture, &platforms.architectures);
        check(
            "virtualization",
            &s.virtualization,
            &platforms.virtualization,
        );
        if let Some(os) = &s.os {
            match platforms.os_families.iter().find(|f| f.family == os.family) {
                None => unmet(
                    "platform",
                    at("os.family"),
                    format!("{} is not a supported OS family", os.family),
                ),
                Some(min) => {
                    let ok = match (parse_version(&os.version), parse_version(&min.version)) {
                        (Some(v), Some(m)) => version_at_least(&v, &m),
                        _ => false,
                    };
                    if !ok {
                        unmet(
                            "platform",
                            at("os.version"),
                            format!(
                                "{} {} is older than the least supported, {}",
                                os.family, os.version, min.version
                            ),
                        );
                    }
                }
            }
        }
        if let (Some(kernel), Some(min)) = (&s.kernel, &platforms.min_kernel) {
            let ok = match (parse_version(kernel), parse_version(min)) {
                (Some(k), Some(m)) => version_at_least(&k, &m),
                _ => false,
            };
            if !ok {
                unmet(
                    "platform",
                    at("kernel"),
                    format!("kernel {kernel} is older than the least supported, {min}"),
                );
            }
        }
        if let Some(a) = standing.agreement {
            if !a.resource_kinds.contains(&set.kind) {
                unmet(
                    "resource_kind",
                    Some(format!("resource_sets[{i}].kind")),
                    format!("{} capacity is not in the agreement", name_of(&set.kind)),
                );
            }
        }
    }
    if let Some(a) = standing.agreement {
        for (i, mode) in request.pricing.modes.iter().enumerate() {
            if !a.pricing_modes.contains(mode) {
                unmet(
                    "pricing_mode",
                    Some(format!("pricing.modes[{i}]")),
                    format!("{} pricing is not in the agreement", name_of(mode)),
                );
            }
        }
        let hosts: u32 = request
            .resource_sets
            .iter()
            .map(|s| s.hosts.len() as u32)
            .sum();
        if standing.listed_hosts.saturating_add(hosts) > a.max_hosts {
            unmet(
                "max_hosts",
                Some("resource_sets".into()),
                format!(
                    "{hosts} hosts with the {} offered already is more than the agreement's {}",
                    standing.listed_hosts, a.max_hosts
                ),
            );
        }
        let cpus = claimed_cpus(request);
        if let Some(max) = a.max_cpus {
            if standing.held_cpus.saturating_add(cpus) > max {
                unmet(
                    "max_cpus",
                    Some("resource_sets".into()),
                    format!(
                        "{cpus} CPU threads with the {} offered already is more than the agreement's {max}",
                        standing.held_cpus
                    ),
                );
            }
        }
    }
    out
}

/// What the acceptance criteria require besides the claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Requirements {
    /// How far below a claim a measurement may fall.
    pub tolerances: Tolerances,
    /// The least hardening index (0 to 100).
    pub min_hardening: u8,
    /// The size categories; a host must reach the smallest.
    pub categories: Categories,
}

/// What a host's validation run measured.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    /// The host's inventory.
    pub inventory: &'a Inventory,
    /// The benchmark suite's report.
    pub bench: &'a BenchReport,
    /// The security checks' report.
    pub security: &'a SecurityReport,
    /// The compatibility kit's report.
    pub compat: &'a CompatReport,
}

/// One acceptance criterion as judged, with what was claimed, measured and required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Criterion {
    /// `spec`, `category`, `hardening`, `critical_findings` or `compatibility`.
    pub rule: String,
    /// The claimed field it judges, when one (`system.threads`, `system.benchmarks.cpu.int.multi`).
    pub field: Option<String>,
    /// It is met.
    pub passed: bool,
    /// What was claimed.
    pub claimed: Option<String>,
    /// What was measured.
    pub measured: Option<String>,
    /// What was needed.
    pub required: Option<String>,
}

/// A host judged against its resource set's claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assessment {
    /// Every criterion, met or not.
    pub criteria: Vec<Criterion>,
    /// The size category the measurements imply (never the claim).
    pub category: Option<String>,
    /// What a listing of the host shows, as measured.
    #[serde(default)]
    pub measured: MeasuredFacts,
}

/// What a host's validation measured that its listing shows to clients.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeasuredFacts {
    /// The benchmark suite's composite score (1.0: the reference machine).
    pub score: f64,
    /// The security checks' hardening index, 0 to 100.
    pub hardening_index: u8,
    /// The compatibility level the kit verified.
    pub compat_level: Option<CompatLevel>,
    /// The operations of the control interface the kit saw pass.
    pub operations: Vec<String>,
}

impl Assessment {
    /// Every criterion is met.
    pub fn accepted(&self) -> bool {
        self.criteria.iter().all(|c| c.passed)
    }
}

/// Benchmark units where less is better.
fn lower_is_better(unit: &str) -> bool {
    unit == "ns"
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Judges one host of `set` by its validation `evidence` (C2's acceptance criteria):
/// the tested specification conforms to the claimed one within `tolerances` (more
/// than claimed always conforms; thread counts must be met); claimed benchmark
/// figures are met within the score tolerance (in their units, less being better for
/// latencies); the measurements reach the smallest size category; the hardening index
/// is at least the minimum and no critical finding failed; the verified compatibility
/// is at least the claimed one. The category is decided from the measurements only.
pub fn assess(set: &ResourceSet, evidence: &Evidence<'_>, req: &Requirements) -> Assessment {
    let mut criteria = Vec::new();
    let inv = evidence.inventory;
    let claimed = &set.system;

    // The specification: what compare() judges, and the exact CPU counts.
    let tested = Spec::tested(inv, BTreeMap::new());
    let claim = Spec {
        cores: claimed.threads,
        memory_bytes: claimed.memory_bytes,
        disk_bytes: claimed.disk_bytes,
        clock_mhz: claimed.clock_mhz,
        scores: BTreeMap::new(),
    };
    let short = compare(&claim, &tested, &req.tolerances);
    let spec_fields = [
        (
            "cores",
            "system.threads",
            claim.cores.map(f64::from),
            tested.cores.map(f64::from),
        ),
        (
            "memory_bytes",
            "system.memory_bytes",
            claim.memory_bytes.map(|v| v as f64),
            tested.memory_bytes.map(|v| v as f64),
        ),
        (
            "disk_bytes",
            "system.disk_bytes",
            claim.disk_bytes.map(|v| v as f64),
            tested.disk_bytes.map(|v| v as f64),
        ),
        (
            "clock_mhz",
            "system.clock_mhz",
            claim.clock_mhz.map(f64::from),
            tested.clock_mhz.map(f64::from),
        ),
    ];
    for (name, field, claimed_value, measured) in spec_fields {
        let Some(claimed_value) = claimed_value else {
            continue;
        };
        let mismatch = short.iter().find(|m| m.field == name);
        criteria.push(Criterion {
            rule: "spec".into(),
            field: Some(field.into()),
            passed: mismatch.is_none(),
            claimed: Some(number(claimed_value)),
            measured: measured.map(number),
            required: mismatch.map(|m| format!("at least {}", number(m.minimum))),
        });
    }
    for (field, claimed_value, measured) in [
        ("system.sockets", claimed.sockets, inv.cpu.sockets),
        ("system.cores", claimed.cores, inv.cpu.physical_cores),
        ("system.gpus", claimed.gpus, Some(inv.gpus.len() as u32)),
    ] {
        let Some(c) = claimed_value else { continue };
        criteria.push(Criterion {
            rule: "spec".into(),
            field: Some(field.into()),
            passed: measured.is_some_and(|m| m >= c),
            claimed: Some(c.to_string()),
            measured: measured.map(|m| m.to_string()),
            required: Some(format!("at least {c}")),
        });
    }
    for figure in &claimed.benchmarks {
        let field = format!("system.benchmarks.{}", figure.id);
        let result = evidence.bench.results.iter().find(|r| r.id == figure.id);
        let tolerance = req.tolerances.score.clamp(0.0, 1.0);
        let (passed, required, measured) = match result {
            Some(r) if r.unit == figure.unit => {
                let (ok, bound) = if lower_is_better(&r.unit) {
                    let most = figure.value * (1.0 + tolerance);
                    (
                        r.value <= most,
                        format!("at most {} {}", number(most), r.unit),
                    )
                } else {
                    let least = figure.value * (1.0 - tolerance);
                    (
                        r.value >= least,
                        format!("at least {} {}", number(least), r.unit),
                    )
                };
                (ok, bound, Some(format!("{} {}", number(r.value), r.unit)))
            }
            Some(r) => (
                false,
                format!("a figure in {}", r.unit),
                Some(format!("{} {}", number(r.value), r.unit)),
            ),
            None => (false, "a measured figure".into(), None),
        };
        criteria.push(Criterion {
            rule: "spec".into(),
            field: Some(field),
            passed,
            claimed: Some(format!("{} {}", number(figure.value), figure.unit)),
            measured,
            required: Some(required),
        });
    }

    // The size category, from the measurements only.
    let measured = Measured {
        cores: inv.cpu.logical_cpus,
        memory_bytes: inv.memory.total_bytes,
        score: evidence.bench.composite_score,
    };
    let category = req.categories.classify(&measured).map(|c| c.name.clone());
    let smallest = &req.categories.list()[0];
    criteria.push(Criterion {
        rule: "category".into(),
        field: None,
        passed: category.is_some(),
        claimed: None,
        measured: Some(format!(
            "{} CPUs, {} bytes, score {}",
            measured.cores,
            measured.memory_bytes,
            number(measured.score)
        )),
        required: Some(format!(
            "at least {} ({} CPUs, {} bytes, score {})",
            smallest.name,
            smallest.min_cores,
            smallest.min_memory_bytes,
            number(smallest.min_score)
        )),
    });

    // Security.
    criteria.push(Criterion {
        rule: "hardening".into(),
        field: None,
        passed: evidence.security.hardening_index >= req.min_hardening,
        claimed: None,
        measured: Some(evidence.security.hardening_index.to_string()),
        required: Some(format!("at least {}", req.min_hardening)),
    });
    let critical: Vec<&str> = evidence
        .security
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Critical && f.status == CheckStatus::Fail)
        .map(|f| f.id.as_str())
        .collect();
    criteria.push(Criterion {
        rule: "critical_findings".into(),
        field: None,
        passed: critical.is_empty(),
        claimed: None,
        measured: Some(if critical.is_empty() {
            "none".into()
        } else {
            critical.join(", ")
        }),
        required: Some("none".into()),
    });

    // Compatibility: the kit's verified level and operations against the claim.
    let passed_ops: BTreeSet<&str> = evidence
        .compat
        .checks
        .iter()
        .filter(|c| c.passed)
        .map(|c| c.operation.as_str())
        .collect();
    let (passed, claimed_text, required) = match &set.compatibility {
        ClaimedCompatibility::Full => (
            evidence.compat.level == CompatLevel::Fully,
            "full".to_owned(),
            "every operation passes".to_owned(),
        ),
        ClaimedCompatibility::Partial { operations } => {
            let missing: Vec<&str> = operations
                .iter()
                .map(String::as_str)
                .filter(|op| !passed_ops.contains(op))
                .collect();
            (
                missing.is_empty(),
                format!("partial: {}", operations.join(", ")),
                if missing.is_empty() {
                    "the claimed operations pass".to_owned()
                } else {
                    format!(
                        "the claimed operations pass; failing: {}",
                        missing.join(", ")
                    )
                },
            )
        }
        ClaimedCompatibility::Other { specification } => (
            true,
            format!("other: {specification}"),
            "nothing of this interface".to_owned(),
        ),
        ClaimedCompatibility::BareMetal => (
            true,
            "bare metal".to_owned(),
            "nothing of this interface".to_owned(),
        ),
    };
    criteria.push(Criterion {
        rule: "compatibility".into(),
        field: Some("compatibility".into()),
        passed,
        claimed: Some(claimed_text),
        measured: Some(
            format!(
                "{:?} ({} of {} operations)",
                evidence.compat.level,
                passed_ops.len(),
                evidence.compat.checks.len()
            )
            .to_lowercase(),
        ),
        required: Some(required),
    });
    Assessment {
        criteria,
        category,
        measured: MeasuredFacts {
            score: evidence.bench.composite_score,
            hardening_index: evidence.security.hardening_index,
            compat_level: Some(evidence.compat.level),
            operations: passed_ops.iter().map(|op| (*op).to_owned()).collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ResellRequest {
        serde_json::from_value(serde_json::json!({
            "contact": "ops@bob.example",
            "resource_sets": [{
                "kind": "compute",
                "zone": "bob-fra-1",
                "hosts": ["01930000-0000-7000-8000-000000000001"],
                "system": {
                    "cpu_vendor": "GenuineIntel", "architecture": "x86_64",
                    "virtualization": "kvm", "sockets": 1, "cores": 4, "threads": 8,
                    "memory_bytes": 17179869184u64,
                    "os": {"family": "debian", "version": "12"}, "kernel": "6.1.0-18-amd64",
                    "benchmarks": [{"id": "cpu.sha256.multi", "value": 2400.0, "unit": "MB/s"}]
                },
                "compatibility": {"level": "full"}
            }],
            "pricing": {"modes": ["on_demand", "spot"], "currency": "EUR", "minimum_price": 20, "immediate_price": 35},
            "interruptibility": "price_based",
            "goal": "maximise_revenue"
        }))
        .expect("the example is well formed")
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn a_well_formed_request_has_no_problems() {
        assert_eq!(validate(&request()), []);
    }

    #[test]
    fn every_problem_of_a_document_is_named_by_its_field_at_once() {
        let mut r = request();
        r.contact = " ".into();
        let set = &mut r.resource_sets[0];
        set.zone = "fra 1".into();
        set.system.threads = Some(2);
        set.system.sockets = Some(0);
        set.system.os = Some(ClaimedOs {
            family: "debian".into(),
            version: "bookworm".into(),
        });
        set.system.benchmarks.push(ClaimedFigure {
            id: "cpu.sha256.multi".into(),
            value: f64::NAN,
            unit: "".into(),
        });
        set.hosts.push(set.hosts[0]);
        r.pricing.currency = "eur".into();
        r.pricing.immediate_price = Some(10);
        r.pricing.modes.push(PricingMode::Spot);
        r.grace_ms = Some(-1);
        assert_eq!(
            fields(&validate(&r)),
            [
                "contact",
                "resource_sets[0].zone",
                "resource_sets[0].hosts[1]",
                "resource_sets[0].system.sockets",
                "resource_sets[0].system.threads",
                "resource_sets[0].system.os.version",
                "resource_sets[0].system.benchmarks[1].id",
                "resource_sets[0].system.benchmarks[1].value",
                "resource_sets[0].system.benchmarks[1].unit",
                "pricing.modes",
                "pricing.currency",
                "pricing.immediate_price",
                "grace_ms",
            ]
        );
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_name() {
        let mut v = serde_json::to_value(request()).unwrap();
        v["resource_sets"][0]["system"]["cpus"] = 4.into();
        let err = serde_json::from_value::<ResellRequest>(v).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpus`"), "{err}");
    }

    fn agreement() -> Agreement {
        Agreement {
            id: "agr-0000000000000001".into(),
            provider: "bob".into(),
            valid_from_ms: 1_000,
            valid_until_ms: 10_000,
            resource_kinds: [ResourceKind::Compute].into(),
            pricing_modes: [PricingMode::OnDemand, PricingMode::Spot].into(),
            commission_bps: 1_500,
            max_hosts: 10,
            max_cpus: None,
            created_at_ms: 1_000,
        }
    }

    fn platforms() -> Platforms {
        Platforms {
            cpu_vendors: ["GenuineIntel".into(), "AuthenticAMD".into()].into(),
            architectures: ["x86_64".into()].into(),
            virtualization: ["bare_metal".into(), "kvm".into()].into(),
            os_families: vec![ClaimedOs {
                family: "debian".into(),
                version: "11".into(),
            }],
            min_kernel: Some("5.10".into()),
        }
    }

    fn rules(unmet: &[Unmet]) -> Vec<(&str, Option<&str>)> {
        unmet
            .iter()
            .map(|u| (u.rule.as_str(), u.field.as_deref()))
            .collect()
    }

    /// Each case: (rule it pins, how the request or standing differs, the unmet
    /// criteria).
    #[test]
    fn each_preliminary_criterion_is_reported_with_its_rule() {
        let a = agreement();
        let ended = Agreement {
            valid_until_ms: 5_000,
            ..agreement()
        };
        // The request offers one host claimed with 8 threads.
        assert_eq!(claimed_cpus(&request()), 8);
        let capped = Agreement {
            max_cpus: Some(64),
            ..agreement()
        };
        let p = platforms();
        let bob = Provider {
            account: "bob".into(),
            name: "Bob".into(),
            contact: "ops@bob.example".into(),
            zones: vec!["bob-fra-1".into()],
            accepted: true,
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        let shunned = Provider {
            accepted: false,
            ..bob.clone()
        };
        let elsewhere = Provider {
            zones: vec!["bob-ams-1".into()],
            ..bob.clone()
        };
        let none_taken = BTreeMap::new();
        let standing = |agreement, provider, listed_hosts, now_ms| Standing {
            agreement,
            provider,
            taken: &none_taken,
            platforms: &p,
            listed_hosts,
            held_cpus: 0,
            now_ms,
        };
        let mut arm = request();
        arm.resource_sets[0].system.architecture = Some("aarch64".into());
        let mut old_os = request();
        old_os.resource_sets[0].system.os = Some(ClaimedOs {
            family: "debian".into(),
            version: "10".into(),
        });
        let mut old_kernel = request();
        old_kernel.resource_sets[0].system.kernel = Some("4.19.0-26".into());
        let mut auction = request();
        auction.pricing.modes.push(PricingMode::Auction);
        let mut storage = request();
        storage.resource_sets[0].kind = ResourceKind::Storage;
        type Case<'a> = (
            &'a str,
            ResellRequest,
            Standing<'a>,
            Vec<(&'a str, Option<&'a str>)>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "all met",
                request(),
                standing(Some(&a), Some(&bob), 0, 2_000),
                vec![],
            ),
            (
                "no agreement",
                request(),
                standing(None, Some(&bob), 0, 2_000),
                vec![("agreement", None)],
            ),
            (
                "an expired agreement",
                request(),
                standing(Some(&ended), Some(&bob), 0, 6_000),
                vec![("agreement", None)],
            ),
            (
                "an agreement not yet in force",
                request(),
                standing(Some(&a), Some(&bob), 0, 500),
                vec![("agreement", None)],
            ),
            (
                "a provider not recorded",
                request(),
                standing(Some(&a), None, 0, 2_000),
                vec![("provider", None)],
            ),
            (
                "a zone that is not one of the provider's data centers",
                request(),
                standing(Some(&a), Some(&elsewhere), 0, 2_000),
                vec![("zone", Some("resource_sets[0].zone"))],
            ),
            (
                "a provider not on the accepted list",
                request(),
                standing(Some(&a), Some(&shunned), 0, 2_000),
                vec![("accepted_provider", None)],
            ),
            (
                "an unsupported architecture",
                arm,
                standing(Some(&a), Some(&bob), 0, 2_000),
                vec![("platform", Some("resource_sets[0].system.architecture"))],
            ),
            (
                "an OS older than the least supported",
                old_os,
                standing(Some(&a), Some(&bob), 0, 2_000),
                vec![("platform", Some("resource_sets[0].system.os.version"))],
            ),
            (
                "a kernel older than the least supported",
                old_kernel,
                standing(Some(&a), Some(&bob), 0, 2_000),
                vec![("platform", Some("resource_sets[0].system.kernel"))],
            ),
            (
                "a pricing mode outside the agreement",
                auction,
                standing(Some(&a), Some(&bob), 0, 2_000),
                vec![("pricing_mode", Some("pricing.modes[2]"))],
            ),
            (
                "a resource kind outside the agreement",
                storage,
                standing(Some(&a), Some(&bob), 0, 2_000),
                vec![("resource_kind", Some("resource_sets[0].kind"))],
            ),
            (
                "more hosts than the agreement allows, counting those listed",
                request(),
                standing(Some(&a), Some(&bob), 10, 2_000),
                vec![("max_hosts", Some("resource_sets"))],
            ),
            (
                "within the agreement's CPUs, counting those offered",
                request(),
                Standing {
                    held_cpus: 56,
                    ..standing(Some(&capped), Some(&bob), 0, 2_000)
                },
                vec![],
            ),
            (
                "more CPUs than the agreement allows, counting those offered",
                request(),
                Standing {
                    held_cpus: 57,
                    ..standing(Some(&capped), Some(&bob), 0, 2_000)
                },
                vec![("max_cpus", Some("resource_sets"))],
            ),
        ];
        for (rule, r, s, want) in cases {
            assert_eq!(rules(&preliminary(&r, &s)), want, "{rule}");
        }
        // A host held elsewhere is named by its field.
        let req = request();
        let held: BTreeMap<Uuid, String> = [(
            req.resource_sets[0].hosts[0],
            "listing lst-1 holds it".to_owned(),
        )]
        .into();
        let s = Standing {
            taken: &held,
            ..standing(Some(&a), Some(&bob), 0, 2_000)
        };
        assert_eq!(
            rules(&preliminary(&req, &s)),
            [("host_taken", Some("resource_sets[0].hosts[0]"))]
        );
        // The reasons carry the numbers.
        let u = preliminary(&request(), &standing(Some(&ended), Some(&bob), 0, 6_000));
        assert_eq!(u[0].message, "the agreement ended at 5000 (now 6000)");
        // Every unmet criterion at once.
        assert_eq!(
            preliminary(&request(), &standing(None, Some(&shunned), 0, 2_000)).len(),
            2
        );
    }

    /// This host, as validation measured it: 8 CPUs (4 cores, 1 socket), 16 GiB, a
    /// composite score of 1.2, hardening 80, fully compatible.
    struct Host {
        inventory: Inventory,
        bench: BenchReport,
        security: SecurityReport,
        compat: CompatReport,
    }

    fn host() -> Host {
        let mut inventory = Inventory::default();
        inventory.cpu.logical_cpus = 8;
        inventory.cpu.physical_cores = Some(4);
        inventory.cpu.sockets = Some(1);
        inventory.cpu.max_mhz = Some(3000);
        inventory.memory.total_bytes = 16 << 30;
        let figure = |id: &str, unit: &str, value: f64| surplus_protocol::bench::BenchResult {
            id: id.into(),
            unit: unit.into(),
            value,
            repetitions: vec![value],
            cv: 0.01,
            reference: value,
            score: 1.0,
            duration_ms: 1,
            note: None,
        };
        let finding = |id: &str, severity, status| surplus_protocol::security::Finding {
            id: id.into(),
            title: id.into(),
            severity,
            status,
            evidence: String::new(),
            remediation: String::new(),
        };
        let check = |op: &str, passed| surplus_protocol::control::CompatCheck {
            operation: op.into(),
            passed,
            message: None,
        };
        Host {
            inventory,
            bench: BenchReport {
                plan: Default::default(),
                results: vec![
                    figure("cpu.sha256.multi", "MB/s", 2400.0),
                    figure("memory.latency", "ns", 90.0),
                ],
                cache_levels_bytes: Vec::new(),
                composite_score: 1.2,
                skipped: Vec::new(),
                cancelled: false,
                duration_ms: 1,
            },
            security: SecurityReport {
                root: "/".into(),
                live: true,
                findings: vec![
                    finding("ssh.root-login", Severity::High, CheckStatus::Pass),
                    finding(
                        "fs.world-writable-etc",
                        Severity::Critical,
                        CheckStatus::Pass,
                    ),
                ],
                hardening_index: 80,
                band: "good".into(),
            },
            compat: CompatReport {
                driver: "process".into(),
                level: CompatLevel::Fully,
                checks: vec![
                    check("run", true),
                    check("stop", true),
                    check("volume-create", true),
                ],
                isolation: Default::default(),
                ran_at_ms: 1,
            },
        }
    }

    fn evidence(h: &Host) -> Evidence<'_> {
        Evidence {
            inventory: &h.inventory,
            bench: &h.bench,
            security: &h.security,
            compat: &h.compat,
        }
    }

    fn requirements() -> Requirements {
        Requirements {
            tolerances: Tolerances::default(),
            min_hardening: 60,
            categories: Categories::standard(),
        }
    }

    fn failed(a: &Assessment) -> Vec<(&str, Option<&str>)> {
        a.criteria
            .iter()
            .filter(|c| !c.passed)
            .map(|c| (c.rule.as_str(), c.field.as_deref()))
            .collect()
    }

    /// Each case: (rule it pins, the claim or the host changed, the failed criteria).
    #[test]
    fn each_acceptance_criterion_judges_claim_against_measurement() {
        type Change = fn(&mut ResourceSet, &mut Host);
        type Failed = Vec<(&'static str, Option<&'static str>)>;
        let cases: Vec<(&str, Change, Failed)> = vec![
            ("as claimed: accepted", |_, _| {}, vec![]),
            (
                "four times this host's threads",
                |s, _| s.system.threads = Some(32),
                vec![("spec", Some("system.threads"))],
            ),
            (
                "twice its memory",
                |s, _| s.system.memory_bytes = Some(32 << 30),
                vec![("spec", Some("system.memory_bytes"))],
            ),
            (
                "memory 4% below the claim is within the 5% tolerance",
                |s, _| s.system.memory_bytes = Some((16u64 << 30) * 100 / 96),
                vec![],
            ),
            (
                "physical cores must be met",
                |s, _| s.system.cores = Some(8),
                vec![("spec", Some("system.cores"))],
            ),
            (
                "a benchmark figure claimed 20% above the measured one",
                |s, _| s.system.benchmarks[0].value = 2880.0,
                vec![("spec", Some("system.benchmarks.cpu.sha256.multi"))],
            ),
            (
                "a latency claimed 20% below the measured one (less is better)",
                |s, _| {
                    s.system.benchmarks.push(ClaimedFigure {
                        id: "memory.latency".into(),
                        value: 72.0,
                        unit: "ns".into(),
                    })
                },
                vec![("spec", Some("system.benchmarks.memory.latency"))],
            ),
            (
                "a figure claimed in another unit",
                |s, _| s.system.benchmarks[0].unit = "GB/s".into(),
                vec![("spec", Some("system.benchmarks.cpu.sha256.multi"))],
            ),
            (
                "hardening below the minimum",
                |_, h| h.security.hardening_index = 59,
                vec![("hardening", None)],
            ),
            (
                "a failed critical finding",
                |_, h| h.security.findings[1].status = CheckStatus::Fail,
                vec![("critical_findings", None)],
            ),
            (
                "a failed high finding is not a critical one",
                |_, h| h.security.findings[0].status = CheckStatus::Fail,
                vec![],
            ),
            (
                "claims full compatibility, the kit verified high",
                |_, h| h.compat.level = CompatLevel::Highly,
                vec![("compatibility", Some("compatibility"))],
            ),
            (
                "claims operations the kit saw fail",
                |s, h| {
                    s.compatibility = ClaimedCompatibility::Partial {
                        operations: vec!["run".into(), "stop".into()],
                    };
                    h.compat.level = CompatLevel::Somewhat;
                    h.compat.checks[1].passed = false;
                },
                vec![("compatibility", Some("compatibility"))],
            ),
            (
                "claims only operations that pass",
                |s, h| {
                    s.compatibility = ClaimedCompatibility::Partial {
                        operations: vec!["run".into()],
                    };
                    h.compat.level = CompatLevel::Somewhat;
                    h.compat.checks[1].passed = false;
                },
                vec![],
            ),
            (
                "below the smallest category, though as claimed",
                |s, h| {
                    s.system.memory_bytes = Some(512 << 20);
                    h.inventory.memory.total_bytes = 512 << 20;
                },
                vec![("category", None)],
            ),
        ];
        for (rule, change, want) in cases {
            let mut set = request().resource_sets.remove(0);
            set.system.clock_mhz = Some(3000);
            let mut h = host();
            change(&mut set, &mut h);
            let a = assess(&set, &evidence(&h), &requirements());
            assert_eq!(failed(&a), want, "{rule}");
            assert_eq!(a.accepted(), want.is_empty(), "{rule}");
        }
        // The evidence of a failure: claimed against measured against required.
        let mut set = request().resource_sets.remove(0);
        set.system.threads = Some(32);
        let a = assess(&set, &evidence(&host()), &requirements());
        let c = a.criteria.iter().find(|c| !c.passed).unwrap();
        assert_eq!(
            (
                c.claimed.as_deref(),
                c.measured.as_deref(),
                c.required.as_deref()
            ),
            (Some("32"), Some("8"), Some("at least 32"))
        );
        // 8 CPUs and 16 GiB with a score of 1.2: medium (large needs 16 CPUs).
        assert_eq!(a.category.as_deref(), Some("medium"));
    }

    fn claimed_system() -> impl proptest::strategy::Strategy<Value = ClaimedSystem> {
        use proptest::prelude::*;
        (
            proptest::option::of(1u32..1024),
            proptest::option::of(1u32..512),
            proptest::option::of(1u64..1 << 42),
            proptest::option::of(0.1f64..1e6),
        )
            .prop_map(|(threads, cores, memory_bytes, figure)| ClaimedSystem {
                threads,
                cores,
                memory_bytes,
                benchmarks: figure
                    .map(|value| ClaimedFigure {
                        id: "cpu.sha256.multi".into(),
                        value,
                        unit: "MB/s".into(),
                    })
                    .into_iter()
                    .collect(),
                ..ClaimedSystem::default()
            })
    }

    proptest::proptest! {
        /// Whatever a provider claims, a host lands in the category its
        /// measurements imply: claims decide acceptance, never the category.
        #[test]
        fn the_category_never_depends_on_claimed_values(
            a in claimed_system(),
            b in claimed_system(),
            cpus in 1u32..256,
            memory_gib in 1u64..1024,
            score in 0.0f64..8.0,
        ) {
            let mut h = host();
            h.inventory.cpu.logical_cpus = cpus;
            h.inventory.memory.total_bytes = memory_gib << 30;
            h.bench.composite_score = score;
            let with = |system: ClaimedSystem| {
                let mut set = request().resource_sets.remove(0);
                set.system = system;
                assess(&set, &evidence(&h), &requirements()).category
            };
            let measured = requirements()
                .categories
                .classify(&Measured { cores: cpus, memory_bytes: memory_gib << 30, score })
                .map(|c| c.name.clone());
            proptest::prop_assert_eq!(with(a), measured.clone());
            proptest::prop_assert_eq!(with(b), measured);
        }
    }

    #[test]
    fn profiles_and_agreements_name_their_bad_fields() {
        let p = Provider {
            account: "bob".into(),
            name: " ".into(),
            contact: "ops@bob.example".into(),
            zones: vec!["fra-1".into(), "fra 2".into(), "fra-1".into()],
            accepted: true,
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        assert_eq!(
            fields(&validate_provider(&p)),
            ["name", "zones[1]", "zones[2]"]
        );
        assert_eq!(validate_agreement(&agreement()), []);
        let a = Agreement {
            valid_until_ms: 1_000,
            resource_kinds: BTreeSet::new(),
            commission_bps: 10_001,
            max_hosts: 0,
            ..agreement()
        };
        assert_eq!(
            fields(&validate_agreement(&a)),
            [
                "valid_until_ms",
                "resource_kinds",
                "commission_bps",
                "max_hosts"
            ]
        );
        assert!(agreement().in_force(1_000) && !agreement().in_force(10_000));
    }

    #[test]
    fn the_standard_platforms_are_valid_and_bad_ones_are_named() {
        assert_eq!(Platforms::standard().validate(), []);
        let mut p = Platforms::standard();
        p.architectures.insert("x86 64".into());
        p.os_families.push(ClaimedOs {
            family: "debian".into(),
            version: "trixie".into(),
        });
        p.min_kernel = Some("latest".into());
        assert_eq!(
            fields(&p.validate()),
            [
                "architectures",
                "os_families[5].family",
                "os_families[5].version",
                "min_kernel"
            ]
        );
    }

    #[test]
    fn versions_compare_as_numbers() {
        let v = |s| parse_version(s).unwrap();
        assert_eq!(v("6.1.0-18-amd64"), [6, 1, 0]);
        assert!(version_at_least(&v("22.04"), &v("20.10")));
        assert!(version_at_least(&v("12"), &v("12.0")));
        assert!(version_at_least(&v("5.10.1"), &v("5.10")));
        assert!(!version_at_least(&v("5.9"), &v("5.10")));
        assert_eq!(parse_version("bookworm"), None);
        assert_eq!(parse_version(""), None);
    }
}
