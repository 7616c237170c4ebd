//! `surplus resell|listings|notifications`: a provider's resell requests, the listings
//! clients search, and the caller's notifications.

use anyhow::Context;
use clap::Subcommand;
use surplus_api::resell::{
    Listing, ListingView, NotificationView, Rating, ResellRequest, ResellView,
};
use surplus_market::records::names_of;

use crate::client::{Client, print, table};

#[derive(Subcommand)]
pub enum Command {
    /// Resell requests: offer your hosts for resale and follow each through validation.
    Resell {
        #[command(subcommand)]
        command: ResellCommand,
    },
    /// The listings clients buy from.
    Listings {
        #[command(subcommand)]
        command: ListingsCommand,
    },
    /// Clients' ratings of providers.
    Ratings {
        #[command(subcommand)]
        command: RatingsCommand,
    },
    /// Where your notifications are POSTed: `show`, `set URL` or `clear`.
    Webhook {
        #[command(subcommand)]
        command: WebhookCommand,
    },
    /// Your notifications (a request accepted or rejected, ...), oldest first.
    Notifications {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// `surplus resell`.
#[derive(Subcommand)]
pub enum ResellCommand {
    /// Submit a request from a JSON or TOML document (`-`: JSON on standard input).
    Submit {
        /// The document (`.toml` is read as TOML, anything else as JSON).
        file: std::path::PathBuf,
        /// The provider it is for (admins; a provider submits for itself).
        #[arg(long)]
        provider: Option<String>,
    },
    /// A request's stage, every step with its time, and each host's outcome.
    Status {
        /// The request.
        id: String,
    },
    /// Requests, newest first (yours, as a provider).
    List {
        /// One provider's (admin).
        #[arg(long)]
        provider: Option<String>,
    },
}

/// `surplus listings`.
#[derive(Subcommand)]
pub enum ListingsCommand {
    /// Search the offered listings; every filter given must match.
    Search(Box<SearchArgs>),
    /// A listing with its hosts' validation evidence.
    Show {
        /// The listing (`lst-...`).
        id: String,
    },
    /// Re-test a listing's hosts now (admins, or its provider).
    Retest {
        /// The listing (`lst-...`).
        id: String,
    },
}

/// `surplus webhook`.
#[derive(Subcommand)]
pub enum WebhookCommand {
    /// Your webhook.
    Show,
    /// POST your notifications to this http(s) URL (at least once, retried).
    Set {
        /// The URL.
        url: String,
    },
    /// No webhook.
    Clear,
}

/// `surplus ratings`.
#[derive(Subcommand)]
pub enum RatingsCommand {
    /// Rate the provider whose capacity ran one of your instances (clients).
    Add {
        /// The instance.
        #[arg(long)]
        instance: String,
        /// 1 to 5.
        #[arg(long)]
        score: u8,
        /// What you say.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Ratings, newest first.
    List {
        /// One provider's.
        #[arg(long)]
        provider: Option<String>,
    },
}

/// The filters of `surplus listings search`.
#[derive(clap::Args)]
pub struct SearchArgs {
    /// compute, storage or bandwidth.
    #[arg(long)]
    pub kind: Option<String>,
    /// A size category (`surplus categories show`).
    #[arg(long)]
    pub category: Option<String>,
    /// An availability zone.
    #[arg(long)]
    pub zone: Option<String>,
    /// A provider's account.
    #[arg(long)]
    pub provider: Option<String>,
    /// Sold in this pricing mode: spot, auction, immediate, on_demand, reserved.
    #[arg(long)]
    pub pricing_mode: Option<String>,
    /// dont_care, price_based, fulfilment_based or no_interruptions.
    #[arg(long)]
    pub interruptibility: Option<String>,
    /// At least this compatibility level: fully, highly, somewhat, incompatible.
    #[arg(long)]
    pub compat: Option<String>,
    /// At least this average rating (1 to 5).
    #[arg(long)]
    pub min_rating: Option<String>,
    /// At least this composite benchmark score.
    #[arg(long)]
    pub min_score: Option<String>,
    /// At most this hourly price, minor units.
    #[arg(long)]
    pub max_price: Option<String>,
    /// Priced in this currency (prices compare within one).
    #[arg(long)]
    pub currency: Option<String>,
    /// rank (default), price, score or rating.
    #[arg(long)]
    pub sort: Option<String>,
}

/// Reads a resell request: TOML when the file says so, else JSON.
fn read_request(file: &std::path::Path) -> anyhow::Result<ResellRequest> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    if file.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).with_context(|| format!("{} is not a resell request", file.display()))
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a resell request", file.display()))
    }
}

/// A query string of the pairs that have a value.
pub(crate) fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v {
            q.append_pair(k, v);
        }
    }
    q.finish()
}

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Resell { command } => match command {
            ResellCommand::Submit { file, provider } => {
                let document = read_request(&file)?;
                let path = match provider {
                    Some(p) => format!("/v1/resell-requests?{}", query(&[("provider", Some(p))])),
                    None => "/v1/resell-requests".into(),
                };
                let r: ResellView = client.post(&path, &document).await?;
                print(json, &r, || {
                    println!(
                        "request {} submitted; follow it with: surplus resell status {}",
                        r.id, r.id
                    )
                });
            }
            ResellCommand::Status { id } => {
                let r: ResellView = client.get(&format!("/v1/resell-requests/{id}")).await?;
                print(json, &r, || show_request(&r));
            }
            ResellCommand::List { provider } => {
                let path = format!("/v1/resell-requests?{}", query(&[("provider", provider)]));
                let list: Vec<ResellView> = client.get(&path).await?;
                print(json, &list, || {
                    let mut t =
                        table(&["ID", "PROVIDER", "STAGE", "HOSTS", "LISTINGS", "SUBMITTED"]);
                    for r in &list {
                        t.add_row([
                            r.id.to_string(),
                            r.provider.clone(),
                            surplus_market::records::name_of(&r.stage),
                            r.pipeline.hosts.len().to_string(),
                            r.listings.join(", "),
                            crate::resell::time(r.created_at_ms),
                        ]);
                    }
                    println!("{t}");
                });
            }
        },
        Command::Listings { command } => match command {
            ListingsCommand::Search(args) => {
                let SearchArgs {
                    kind,
                    category,
                    zone,
                    provider,
                    pricing_mode,
                    interruptibility,
                    compat,
                    min_rating,
                    min_score,
                    max_price,
                    currency,
                    sort,
                } = *args;
                let q = query(&[
                    ("kind", kind),
                    ("category", category),
                    ("zone", zone),
                    ("provider", provider),
                    ("pricing_mode", pricing_mode),
                    ("interruptibility", interruptibility),
                    ("compat", compat),
                    ("min_rating", min_rating),
                    ("min_score", min_score),
                    ("max_price", max_price),
                    ("currency", currency),
                    ("sort", sort),
                ]);
                let list: Vec<Listing> = client.get(&format!("/v1/listings?{q}")).await?;
                print(json, &list, || show_listings(&list));
            }
            ListingsCommand::Retest { id } => {
                let v: ListingView = client
                    .post_empty(&format!("/v1/listings/{id}/retest"))
                    .await?;
                print(json, &v, || {
                    println!(
                        "a re-test of {} is asked for; its outcome comes as a notification",
                        v.listing.id
                    )
                });
            }
            ListingsCommand::Show { id } => {
                let v: ListingView = client.get(&format!("/v1/listings/{id}")).await?;
                print(json, &v, || {
                    show_listings(std::slice::from_ref(&v.listing));
                    for e in &v.evidence {
                        println!(
                            "host {} (validation run {})",
                            e.host,
                            e.run.map(|r| r.to_string()).unwrap_or_else(|| "-".into())
                        );
                        if let Some(a) = &e.assessment {
                            show_criteria(a);
                        }
                    }
                });
            }
        },
        Command::Ratings { command } => match command {
            RatingsCommand::Add {
                instance,
                score,
                comment,
            } => {
                let body = surplus_api::resell::RatingRequest {
                    instance,
                    score,
                    comment,
                };
                let r: Rating = client.post("/v1/ratings", &body).await?;
                print(json, &r, || show_ratings(std::slice::from_ref(&r)));
            }
            RatingsCommand::List { provider } => {
                let path = format!("/v1/ratings?{}", query(&[("provider", provider)]));
                let list: Vec<Rating> = client.get(&path).await?;
                print(json, &list, || show_ratings(&list));
            }
        },
        Command::Webhook { command } => {
            let w: surplus_api::resell::Webhook = match command {
                WebhookCommand::Show => client.get("/v1/webhook").await?,
                WebhookCommand::Set { url } => {
                    let body = surplus_api::resell::Webhook { url: Some(url) };
                    client.put("/v1/webhook", &body).await?
                }
                WebhookCommand::Clear => {
                    let body = surplus_api::resell::Webhook { url: None };
                    client.put("/v1/webhook", &body).await?
                }
            };
            print(json, &w, || match &w.url {
                Some(u) => println!("notifications are POSTed to {u}"),
                None => println!("no webhook: read notifications with surplus notifications"),
            });
        }
        Command::Notifications { limit } => {
            let list: Vec<NotificationView> = client
                .get(&format!("/v1/notifications?limit={limit}"))
                .await?;
            print(json, &list, || {
                let mut t = table(&["WHEN", "KIND", "DETAILS"]);
                for n in &list {
                    t.add_row([
                        crate::resell::time(n.created_at_ms),
                        n.kind.clone(),
                        n.body.to_string(),
                    ]);
                }
                println!("{t}");
            });
        }
    }
    Ok(())
}

fn show_ratings(list: &[Rating]) {
    let mut t = table(&["WHEN", "PROVIDER", "CLIENT", "INSTANCE", "SCORE", "COMMENT"]);
    for r in list {
        t.add_row([
            crate::resell::time(r.created_at_ms),
            r.provider.clone(),
            r.client.clone(),
            r.instance.clone(),
            r.score.to_string(),
            r.comment.clone(),
        ]);
    }
    println!("{t}");
}

fn show_request(r: &ResellView) {
    println!(
        "request {} of {}: {}",
        r.id,
        r.provider,
        surplus_market::records::name_of(&r.stage)
    );
    let mut t = table(&["WHEN", "STEP"]);
    for s in &r.pipeline.steps {
        t.add_row([crate::resell::time(s.at_ms), s.what.clone()]);
    }
    println!("{t}");
    for h in &r.pipeline.hosts {
        let outcome = match (&h.assessment, &h.failure) {
            (Some(a), _) if a.accepted() => {
                format!("accepted as {}", a.category.as_deref().unwrap_or("-"))
            }
            (Some(_), _) => "rejected".to_owned(),
            (None, Some(f)) => format!("not validated: {f}"),
            (None, None) if h.run.is_some() => "validating".to_owned(),
            (None, None) => "waiting".to_owned(),
        };
        println!("host {} (set {}): {outcome}", h.host, h.set);
        if let Some(a) = &h.assessment {
            show_criteria(a);
        }
    }
    if !r.pipeline.reasons.is_empty() {
        println!("reasons:");
        for reason in &r.pipeline.reasons {
            println!("  {reason}");
        }
    }
    if !r.listings.is_empty() {
        println!("listings: {}", r.listings.join(", "));
    }
}

fn show_criteria(a: &surplus_api::resell::Assessment) {
    let mut t = table(&[
        "CRITERION",
        "FIELD",
        "MET",
        "CLAIMED",
        "MEASURED",
        "REQUIRED",
    ]);
    for c in &a.criteria {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        t.add_row([
            c.rule.clone(),
            or_dash(&c.field),
            if c.passed { "yes" } else { "NO" }.into(),
            or_dash(&c.claimed),
            or_dash(&c.measured),
            or_dash(&c.required),
        ]);
    }
    println!("{t}");
}

fn show_listings(list: &[Listing]) {
    let mut t = table(&[
        "ID",
        "PROVIDER",
        "ZONE",
        "KIND",
        "CATEGORY",
        "SCORE",
        "HARDENING",
        "COMPAT",
        "PRICING",
        "INTERRUPTIBILITY",
        "PRICE/H",
        "AVAILABLE",
        "RATING",
    ]);
    for l in list {
        t.add_row([
            l.id.clone(),
            l.provider.clone(),
            l.zone.clone(),
            surplus_market::records::name_of(&l.kind),
            l.category.clone(),
            format!("{:.2}", l.score),
            l.hardening_index.to_string(),
            surplus_market::records::name_of(&l.compat_level),
            names_of(&l.pricing_modes),
            surplus_market::records::name_of(&l.interruptibility),
            format!("{} {}", l.price, l.currency),
            l.available.to_string(),
            l.rating
                .map(|r| format!("{r:.1}"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
}
