//! `surplus offers|quote|reserve|reservations|pricing`: buying capacity.

use anyhow::Context;
use clap::Subcommand;
use surplus_api::market::{
    InterruptionView, Offer, PriceHistory, PricingMode, Quote, QuoteRequest, ReclaimRequest,
    ReservationState, ReservationView, ReserveRequest, svg_chart,
};
use surplus_market::records::name_of;

use crate::client::{Client, now_ms, print, table, when};
use crate::market::query;

#[derive(Subcommand)]
pub enum Command {
    /// Search offers you can reserve now, ranked as you ask.
    Offers(Box<OffersArgs>),
    /// Ask for an immediate quote: a listing's price held for a short time.
    Quote {
        /// The listing (`lst-...`).
        listing: String,
    },
    /// Reserve hosts of a listing: on_demand, immediate (with --quote) or reserved
    /// (a long-term term).
    Reserve {
        /// The listing (`lst-...`).
        listing: String,
        /// on_demand, immediate or reserved.
        #[arg(long, default_value = "on_demand")]
        mode: String,
        /// Hosts wanted: all of them or none.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The quote to accept (immediate).
        #[arg(long)]
        quote: Option<uuid::Uuid>,
        /// The term in hours (reserved).
        #[arg(long)]
        term_hours: Option<u64>,
        /// Makes a retry safe: the same token answers with what it reserved before.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// Your reservations.
    Reservations {
        #[command(subcommand)]
        command: ReservationsCommand,
    },
    /// (provider) Take capacity back for your own customers: reservations that allow
    /// it are given notice, and their instances stop when the grace ends.
    Reclaim {
        /// Only reservations on this host (every one of them that allows it, unless
        /// --count).
        #[arg(long)]
        host: Option<uuid::Uuid>,
        /// Only this listing's (an admin names one).
        #[arg(long)]
        listing: Option<String>,
        /// How many hosts (default 1, or every one on --host).
        #[arg(long)]
        count: Option<u32>,
    },
    /// What capacity sold for.
    Pricing {
        #[command(subcommand)]
        command: PricingCommand,
    },
}

/// `surplus reservations`.
#[derive(Subcommand)]
pub enum ReservationsCommand {
    /// Your reservations, newest first.
    List,
    /// One reservation with its access details.
    Show {
        /// The reservation.
        id: uuid::Uuid,
    },
    /// End a reservation now: your instances on its host are stopped and terminated.
    Release {
        /// The reservation.
        id: uuid::Uuid,
    },
}

/// `surplus pricing`.
#[derive(Subcommand)]
pub enum PricingCommand {
    /// The prices capacity sold at, with the range that won recently.
    History {
        /// spot, auction or quote.
        #[arg(long)]
        kind: Option<String>,
        /// A size category.
        #[arg(long)]
        category: Option<String>,
        /// A provider's account.
        #[arg(long)]
        provider: Option<String>,
        /// An availability zone.
        #[arg(long)]
        zone: Option<String>,
        /// A currency.
        #[arg(long)]
        currency: Option<String>,
        /// From this instant, Unix ms.
        #[arg(long)]
        from: Option<i64>,
        /// Until this instant, Unix ms.
        #[arg(long)]
        to: Option<i64>,
        /// hour (default) or day.
        #[arg(long)]
        bucket: Option<String>,
        /// Also write the chart as an SVG file.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
    },
}

/// The filters and ranking of `surplus offers`.
#[derive(clap::Args)]
pub struct OffersArgs {
    /// compute, storage or bandwidth.
    #[arg(long)]
    pub kind: Option<String>,
    /// A size category.
    #[arg(long)]
    pub category: Option<String>,
    /// At least this many CPUs.
    #[arg(long)]
    pub min_cores: Option<u32>,
    /// At least this much memory, GiB.
    #[arg(long)]
    pub min_memory_gb: Option<u64>,
    /// An availability zone.
    #[arg(long)]
    pub zone: Option<String>,
    /// Only these providers, comma separated.
    #[arg(long)]
    pub vendors: Option<String>,
    /// spot, auction, immediate, on_demand or reserved.
    #[arg(long)]
    pub pricing_mode: Option<String>,
    /// dont_care, price_based, fulfilment_based or no_interruptions.
    #[arg(long)]
    pub interruptibility: Option<String>,
    /// At least this compatibility level.
    #[arg(long)]
    pub compat: Option<String>,
    /// At least this average rating (1 to 5).
    #[arg(long)]
    pub min_rating: Option<String>,
    /// At most this hourly price, minor units.
    #[arg(long)]
    pub max_price: Option<u64>,
    /// Priced in this currency.
    #[arg(long)]
    pub currency: Option<String>,
    /// How long you want the capacity, hours: the term offered and each mode's cost.
    #[arg(long)]
    pub period_hours: Option<u64>,
    /// price, score, uptime, rating or mix (default).
    #[arg(long)]
    pub rank_by: Option<String>,
    /// A mix's weight of price.
    #[arg(long)]
    pub w_price: Option<f64>,
    /// A mix's weight of the benchmark score.
    #[arg(long)]
    pub w_score: Option<f64>,
    /// A mix's weight of uptime.
    #[arg(long)]
    pub w_uptime: Option<f64>,
    /// A mix's weight of rating.
    #[arg(long)]
    pub w_rating: Option<f64>,
}

fn mode_of(text: &str) -> anyhow::Result<PricingMode> {
    surplus_market::records::from_name(text)
        .with_context(|| format!("{text:?} is not a pricing mode (on_demand, immediate, reserved)"))
}

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Offers(a) => {
            let s = |v: Option<u64>| v.map(|v| v.to_string());
            let f = |v: Option<f64>| v.map(|v| v.to_string());
            let q = query(&[
                ("kind", a.kind),
                ("category", a.category),
                ("min_cores", a.min_cores.map(|v| v.to_string())),
                ("min_memory_gb", s(a.min_memory_gb)),
                ("zone", a.zone),
                ("vendors", a.vendors),
                ("pricing_mode", a.pricing_mode),
                ("interruptibility", a.interruptibility),
                ("compat", a.compat),
                ("min_rating", a.min_rating),
                ("max_price", s(a.max_price)),
                ("currency", a.currency),
                ("period_hours", s(a.period_hours)),
                ("rank_by", a.rank_by),
                ("w_price", f(a.w_price)),
                ("w_score", f(a.w_score)),
                ("w_uptime", f(a.w_uptime)),
                ("w_rating", f(a.w_rating)),
            ]);
            let offers: Vec<Offer> = client.get(&format!("/v1/offers?{q}")).await?;
            print(json, &offers, || show_offers(&offers));
        }
        Command::Quote { listing } => {
            let q: Quote = client.post("/v1/quotes", &QuoteRequest { listing }).await?;
            print(json, &q, || {
                println!(
                    "quote {}: {} an hour on {}, valid {}; accept it with: surplus reserve {} --mode immediate --quote {}",
                    q.id,
                    q.price,
                    q.listing,
                    when(Some(q.valid_until_ms), now_ms()).replace("in ", "for "),
                    q.listing,
                    q.id
                );
            });
        }
        Command::Reserve {
            listing,
            mode,
            count,
            quote,
            term_hours,
            client_token,
        } => {
            let body = ReserveRequest {
                listing,
                mode: mode_of(&mode)?,
                count: Some(count),
                quote,
                term_hours,
                client_token,
            };
            let made: Vec<ReservationView> = client.post("/v1/reservations", &body).await?;
            print(json, &made, || show_reservations(&made));
        }
        Command::Reclaim {
            host,
            listing,
            count,
        } => {
            let body = ReclaimRequest {
                host,
                listing,
                count,
            };
            let taken: Vec<InterruptionView> = client.post("/v1/reclaims", &body).await?;
            print(json, &taken, || {
                if taken.is_empty() {
                    println!("nothing taken: no reservation held now allows it");
                }
                let now = now_ms();
                for t in &taken {
                    println!(
                        "reservation {} on host {}: its instances stop {}",
                        t.reservation,
                        t.host,
                        when(Some(t.notice.deadline_ms), now)
                    );
                }
            });
        }
        Command::Reservations { command } => match command {
            ReservationsCommand::List => {
                let list: Vec<ReservationView> = client.get("/v1/reservations").await?;
                print(json, &list, || show_reservations(&list));
            }
            ReservationsCommand::Show { id } => {
                let r: ReservationView = client.get(&format!("/v1/reservations/{id}")).await?;
                print(json, &r, || show_reservations(std::slice::from_ref(&r)));
            }
            ReservationsCommand::Release { id } => {
                let r: ReservationView = client
                    .post_empty(&format!("/v1/reservations/{id}/release"))
                    .await?;
                print(json, &r, || {
                    println!("reservation {id} released; its instances are being stopped");
                });
            }
        },
        Command::Pricing { command } => match command {
            PricingCommand::History {
                kind,
                category,
                provider,
                zone,
                currency,
                from,
                to,
                bucket,
                svg,
            } => {
                let title = format!(
                    "Prices of {}",
                    [&kind, &category, &provider, &zone]
                        .iter()
                        .filter_map(|v| v.as_deref())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let q = query(&[
                    ("kind", kind),
                    ("category", category),
                    ("provider", provider),
                    ("zone", zone),
                    ("currency", currency),
                    ("from", from.map(|v| v.to_string())),
                    ("to", to.map(|v| v.to_string())),
                    ("bucket", bucket),
                ]);
                let h: PriceHistory = client.get(&format!("/v1/pricing/history?{q}")).await?;
                if let Some(path) = &svg {
                    let currency = h.points.last().map_or("", |p| p.currency.as_str());
                    let title = match title.as_str() {
                        "Prices of " => "Prices",
                        t => t,
                    };
                    std::fs::write(path, svg_chart(&h.series, currency, title))
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                print(json, &h, || show_history(&h, svg.as_deref()));
            }
        },
    }
    Ok(())
}

fn show_offers(list: &[Offer]) {
    let mut t = table(&[
        "LISTING",
        "PROVIDER",
        "ZONE",
        "CATEGORY",
        "SCORE",
        "PRICES",
        "AVAILABLE",
        "RATING",
        "RESERVED",
    ]);
    let now = now_ms();
    for o in list {
        let l = &o.listing;
        let prices: Vec<String> = o
            .prices
            .iter()
            .map(|p| {
                let mut s = format!("{} {}/h", name_of(&p.mode), p.hourly);
                if p.upfront > 0 {
                    s.push_str(&format!(" +{} upfront", p.upfront));
                }
                if let Some(until) = p.valid_until_ms {
                    s.push_str(&format!(" (holds {})", when(Some(until), now)));
                }
                s
            })
            .collect();
        t.add_row([
            l.id.clone(),
            l.provider.clone(),
            l.zone.clone(),
            l.category.clone(),
            format!("{:.2}", l.score),
            format!("{} ({})", prices.join("; "), l.currency),
            o.available.to_string(),
            l.rating
                .map(|r| format!("{r:.1}"))
                .unwrap_or_else(|| "-".into()),
            o.past_reservations.to_string(),
        ]);
    }
    println!("{t}");
}

fn show_reservations(list: &[ReservationView]) {
    let mut t = table(&[
        "ID", "LISTING", "HOST", "MODE", "PRICE/H", "STARTED", "ENDS", "STATE", "ZONE", "ADDRESS",
    ]);
    let now = now_ms();
    for v in list {
        let r = &v.reservation;
        let state = match r.state {
            ReservationState::Active if v.interruption.is_some() => format!(
                "interrupted {}",
                when(v.interruption.map(|n| n.deadline_ms), now)
            ),
            ReservationState::Active if r.holds_at(now) => "active".to_owned(),
            ReservationState::Active => "ending".to_owned(),
            ReservationState::Ended { why, .. } => why.to_string(),
        };
        t.add_row([
            r.id.to_string(),
            r.listing.clone(),
            r.host.to_string(),
            name_of(&r.mode),
            format!("{} {}", r.price, v.currency),
            when(Some(r.starts_at_ms), now),
            match r.end_ms() {
                Some(e) => when(Some(e), now),
                None => "when released".into(),
            },
            state,
            v.access.as_ref().map_or("-".into(), |a| a.zone.clone()),
            v.access
                .as_ref()
                .and_then(|a| a.address.clone())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
}

fn show_history(h: &PriceHistory, svg: Option<&std::path::Path>) {
    let mut t = table(&[
        "AT", "KIND", "LISTING", "PROVIDER", "ZONE", "CATEGORY", "PRICE",
    ]);
    let now = now_ms();
    for p in &h.points {
        t.add_row([
            when(Some(p.at_ms), now),
            name_of(&p.kind),
            p.listing.clone(),
            p.provider.clone(),
            p.zone.clone(),
            p.category.clone(),
            format!("{} {}", p.price, p.currency),
        ]);
    }
    println!("{t}");
    match &h.guidance {
        Some(g) => println!(
            "recently won: {} to {} (median {}, {} prices)",
            g.low, g.high, g.median, g.count
        ),
        None => println!("nothing sold recently"),
    }
    if let Some(path) = svg {
        println!("chart written to {}", path.display());
    }
}
