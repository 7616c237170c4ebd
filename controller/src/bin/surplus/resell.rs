//! `surplus providers|agreements`: providers of capacity and their agreements.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use surplus_api::resell::{
    Agreement, AgreementRequest, PricingMode, Provider, ProviderRequest, ResourceKind,
};

use surplus_market::records::names_of;

use crate::client::{Client, print, table};

#[derive(Subcommand)]
pub enum Command {
    /// Providers of capacity.
    Providers {
        #[command(subcommand)]
        command: ProvidersCommand,
    },
    /// Business agreements with providers.
    Agreements {
        #[command(subcommand)]
        command: AgreementsCommand,
    },
    /// The platforms a resell request may claim.
    Platforms {
        #[command(subcommand)]
        command: SettingCommand,
    },
    /// The size categories, smallest first.
    Categories {
        #[command(subcommand)]
        command: SettingCommand,
    },
}

/// `surplus platforms|categories`.
#[derive(Subcommand)]
pub enum SettingCommand {
    /// Print them (as JSON: the document `set` takes).
    Show,
    /// Replace them with a JSON document (admin); `-` reads standard input.
    Set {
        /// The file.
        file: std::path::PathBuf,
    },
}

/// Shows or sets the setting served at `path`.
async fn setting(client: &Client, path: &str, command: SettingCommand) -> anyhow::Result<()> {
    let value: serde_json::Value = match command {
        SettingCommand::Show => client.get(path).await?,
        SettingCommand::Set { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let body: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            client.put(path, &body).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// `surplus providers`.
#[derive(Subcommand)]
pub enum ProvidersCommand {
    /// Record a provider, or replace its profile (admin).
    Create {
        /// Its account (what its API tokens and its hosts' `provider` label name).
        account: String,
        /// Its name for people.
        #[arg(long)]
        name: String,
        /// Who to contact.
        #[arg(long)]
        contact: String,
        /// A data center, shown to clients as an availability zone (repeatable).
        #[arg(long = "zone")]
        zones: Vec<String>,
        /// Put it on the accepted-providers list.
        #[arg(long)]
        accepted: bool,
    },
    /// Every provider (admin), or your own profile.
    List,
    /// One provider.
    Show {
        /// Its account.
        account: String,
    },
}

/// `surplus agreements`.
#[derive(Subcommand)]
pub enum AgreementsCommand {
    /// Make an agreement with a provider (admin).
    Create {
        /// The provider's account.
        #[arg(long)]
        provider: String,
        /// In force from (RFC 3339; default: now).
        #[arg(long)]
        from: Option<humantime::Timestamp>,
        /// In force until (RFC 3339).
        #[arg(long, conflicts_with = "lasting", required_unless_present = "lasting")]
        until: Option<humantime::Timestamp>,
        /// In force for this long from its start (`365d`).
        #[arg(long = "for")]
        lasting: Option<humantime::Duration>,
        /// A kind of capacity it may resell: compute, storage, bandwidth (repeatable).
        #[arg(long = "kind", required = true, value_parser = parse_kind)]
        kinds: Vec<ResourceKind>,
        /// A pricing mode it may use: spot, auction, immediate, on_demand, reserved
        /// (repeatable).
        #[arg(long = "pricing", required = true, value_parser = parse_mode)]
        modes: Vec<PricingMode>,
        /// The marketplace's commission in basis points (1500 is 15%).
        #[arg(long)]
        commission_bps: u32,
        /// Most hosts it may have offered at once.
        #[arg(long)]
        max_hosts: u32,
        /// Most CPU threads it may have offered at once, as claimed (default: no
        /// limit beyond --max-hosts).
        #[arg(long)]
        max_cpus: Option<u32>,
    },
    /// Agreements, newest first (yours, as a provider).
    List {
        /// One provider's (admin).
        #[arg(long)]
        provider: Option<String>,
    },
    /// End an agreement now (admin).
    End {
        /// The agreement (`agr-...`).
        id: String,
    },
}

/// A snake_case name as the enum it names.
fn named<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, String> {
    surplus_market::records::from_name(text).ok_or_else(|| format!("{text:?} is not {what}"))
}

fn parse_kind(text: &str) -> Result<ResourceKind, String> {
    named(text, "compute, storage or bandwidth")
}

fn parse_mode(text: &str) -> Result<PricingMode, String> {
    named(text, "spot, auction, immediate, on_demand or reserved")
}

fn unix_ms(t: SystemTime) -> anyhow::Result<i64> {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .context("a time before 1970")?
        .as_millis();
    i64::try_from(ms).context("a time too far away")
}

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Platforms { command } => return setting(client, "/v1/platforms", command).await,
        Command::Categories { command } => return setting(client, "/v1/categories", command).await,
        Command::Providers { command } => match command {
            ProvidersCommand::Create {
                account,
                name,
                contact,
                zones,
                accepted,
            } => {
                let body = ProviderRequest {
                    name,
                    contact,
                    zones,
                    accepted,
                };
                let p: Provider = client
                    .put(&format!("/v1/providers/{account}"), &body)
                    .await?;
                print(json, &p, || show_providers(std::slice::from_ref(&p)));
            }
            ProvidersCommand::List => {
                let list: Vec<Provider> = client.get("/v1/providers").await?;
                print(json, &list, || show_providers(&list));
            }
            ProvidersCommand::Show { account } => {
                let p: Provider = client.get(&format!("/v1/providers/{account}")).await?;
                print(json, &p, || show_providers(std::slice::from_ref(&p)));
            }
        },
        Command::Agreements { command } => match command {
            AgreementsCommand::Create {
                provider,
                from,
                until,
                lasting,
                kinds,
                modes,
                commission_bps,
                max_hosts,
                max_cpus,
            } => {
                let start = from.map(SystemTime::from).unwrap_or_else(SystemTime::now);
                let end = match (until, lasting) {
                    (Some(u), _) => SystemTime::from(u),
                    (None, Some(d)) => start + Duration::from(d),
                    (None, None) => unreachable!("clap requires --until or --for"),
                };
                let body = AgreementRequest {
                    provider,
                    valid_from_ms: from.map(|f| unix_ms(f.into())).transpose()?,
                    valid_until_ms: unix_ms(end)?,
                    resource_kinds: kinds.into_iter().collect(),
                    pricing_modes: modes.into_iter().collect(),
                    commission_bps,
                    max_hosts,
                    max_cpus,
                };
                let a: Agreement = client.post("/v1/agreements", &body).await?;
                print(json, &a, || show_agreements(std::slice::from_ref(&a)));
            }
            AgreementsCommand::List { provider } => {
                let path = match provider {
                    Some(p) => format!("/v1/agreements?provider={p}"),
                    None => "/v1/agreements".into(),
                };
                let list: Vec<Agreement> = client.get(&path).await?;
                print(json, &list, || show_agreements(&list));
            }
            AgreementsCommand::End { id } => {
                let a: Agreement = client
                    .post_empty(&format!("/v1/agreements/{id}/end"))
                    .await?;
                print(json, &a, || show_agreements(std::slice::from_ref(&a)));
            }
        },
    }
    Ok(())
}

fn show_providers(list: &[Provider]) {
    let mut t = table(&["ACCOUNT", "NAME", "CONTACT", "ZONES", "ACCEPTED"]);
    for p in list {
        t.add_row([
            p.account.clone(),
            p.name.clone(),
            p.contact.clone(),
            p.zones.join(", "),
            if p.accepted { "yes" } else { "no" }.into(),
        ]);
    }
    println!("{t}");
}

pub fn time(ms: i64) -> String {
    u64::try_from(ms)
        .ok()
        .map(|ms| {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn show_agreements(list: &[Agreement]) {
    let mut t = table(&[
        "ID",
        "PROVIDER",
        "FROM",
        "UNTIL",
        "KINDS",
        "PRICING",
        "COMMISSION",
        "HOSTS",
        "CPUS",
    ]);
    for a in list {
        t.add_row([
            a.id.clone(),
            a.provider.clone(),
            time(a.valid_from_ms),
            time(a.valid_until_ms),
            names_of(&a.resource_kinds),
            names_of(&a.pricing_modes),
            format!("{:.2}%", f64::from(a.commission_bps) / 100.0),
            a.max_hosts.to_string(),
            a.max_cpus.map_or("-".into(), |c| c.to_string()),
        ]);
    }
    println!("{t}");
}
