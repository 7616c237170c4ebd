//! `surplus offers|quote|reserve|reservations|pricing`: buying capacity.

use anyhow::Context;
use clap::Subcommand;
use surplus_api::market::{
    AuctionBidRequest, AuctionKind, AuctionRequest, AuctionView, BidRequest, BidView,
    InterruptionView, Offer, PriceHistory, PricingMode, Quote, QuoteRequest, ReclaimRequest,
    ReservationState, ReservationView, ReserveRequest, SpotView, svg_chart,
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
    /// Bid on a listing's spot market: the hosts go to the highest bids at one
    /// uniform price, cleared every period; a host won is a reservation that a
    /// later, higher bid can take back after a notice.
    Bid {
        /// The listing (`lst-...`).
        listing: String,
        /// The most you pay per host-hour, minor units.
        #[arg(long)]
        max_price: u64,
        /// Hosts wanted.
        #[arg(long, default_value_t = 1)]
        quantity: u32,
        /// All the hosts or none (default: filled in part).
        #[arg(long)]
        all_or_nothing: bool,
        /// Makes a retry safe: the same token answers with the bid placed before.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// Your spot bids.
    Bids {
        #[command(subcommand)]
        command: BidsCommand,
    },
    /// A listing's spot market: its minimum, capacity, last price and guidance.
    Spot {
        #[command(subcommand)]
        command: SpotCommand,
    },
    /// Auctions of hosts: list, show, create (provider), bid (client).
    Auctions {
        #[command(subcommand)]
        command: AuctionsCommand,
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

/// `surplus bids`.
#[derive(Subcommand)]
pub enum BidsCommand {
    /// Your bids, newest first.
    List,
    /// One bid: what the last clearing gave it and the hosts it holds.
    Show {
        /// The bid.
        id: uuid::Uuid,
    },
    /// Cancel a bid: the hosts it holds are released.
    Cancel {
        /// The bid.
        id: uuid::Uuid,
    },
}

/// `surplus auctions`.
#[derive(Subcommand)]
pub enum AuctionsCommand {
    /// Auctions, newest first.
    List {
        /// Only this listing's.
        #[arg(long)]
        listing: Option<String>,
        /// Only those not closed.
        #[arg(long)]
        open: bool,
    },
    /// One auction: its phase, prices, bids (sealed: after the close) and outcome.
    Show {
        /// The auction.
        id: uuid::Uuid,
    },
    /// (provider) Put one host of a listing up for auction.
    Create(Box<CreateAuctionArgs>),
    /// Bid on an auction.
    Bid {
        /// The auction.
        id: uuid::Uuid,
        /// Per host-hour, minor units.
        #[arg(long)]
        amount: u64,
        /// Makes a retry safe: the same token is the same bid.
        #[arg(long)]
        client_token: Option<String>,
    },
}

/// `surplus auctions create`.
#[derive(clap::Args)]
pub struct CreateAuctionArgs {
    /// The listing (`lst-...`).
    pub listing: String,
    /// english, dutch, sealed_first or sealed_second.
    #[arg(long = "type")]
    pub kind: String,
    /// English and sealed: the lowest bid accepted.
    #[arg(long)]
    pub reserve: Option<u64>,
    /// English: how much each bid must exceed the last by.
    #[arg(long)]
    pub increment: Option<u64>,
    /// English: a bid at this price ends the auction at once.
    #[arg(long)]
    pub buy_now: Option<u64>,
    /// Dutch: the price at the start.
    #[arg(long)]
    pub start: Option<u64>,
    /// Dutch: how much the price falls at each step.
    #[arg(long)]
    pub decrement: Option<u64>,
    /// Dutch: milliseconds between steps.
    #[arg(long)]
    pub every_ms: Option<i64>,
    /// Dutch: the lowest price.
    #[arg(long)]
    pub floor: Option<u64>,
    /// Ends this many seconds from now.
    #[arg(long)]
    pub ends_in: u64,
    /// How long the winner holds the host, hours (default: until released).
    #[arg(long)]
    pub term_hours: Option<u64>,
}

fn auction_kind(a: &CreateAuctionArgs) -> anyhow::Result<AuctionKind> {
    let need = |v: Option<u64>, name: &str| {
        v.with_context(|| format!("--{name} is needed for a {} auction", a.kind))
    };
    Ok(match a.kind.as_str() {
        "english" => AuctionKind::English {
            reserve: need(a.reserve, "reserve")?,
            increment: need(a.increment, "increment")?,
            buy_now: a.buy_now,
        },
        "dutch" => AuctionKind::Dutch {
            start: need(a.start, "start")?,
            decrement: need(a.decrement, "decrement")?,
            every_ms: a
                .every_ms
                .context("--every-ms is needed for a dutch auction")?,
            floor: need(a.floor, "floor")?,
        },
        "sealed_first" => AuctionKind::SealedFirst {
            reserve: need(a.reserve, "reserve")?,
        },
        "sealed_second" => AuctionKind::SealedSecond {
            reserve: need(a.reserve, "reserve")?,
        },
        other => anyhow::bail!(
            "{other:?} is not an auction type (english, dutch, sealed_first, sealed_second)"
        ),
    })
}

/// `surplus spot`.
#[derive(Subcommand)]
pub enum SpotCommand {
    /// A listing's spot market.
    Show {
        /// The listing.
        listing: String,
    },
    /// (provider, admin) Clear a listing's spot market now.
    Clear {
        /// The listing.
        listing: String,
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
        Command::Bid {
            listing,
            max_price,
            quantity,
            all_or_nothing,
            client_token,
        } => {
            let body = BidRequest {
                listing,
                max_price,
                quantity: Some(quantity),
                all_or_nothing,
                client_token,
            };
            let b: BidView = client.post("/v1/bids", &body).await?;
            print(json, &b, || {
                println!(
                    "bid {} placed: up to {} an hour for {} host(s) of {}; it takes part in the next clearing",
                    b.bid.id, b.bid.max_price, b.bid.quantity, b.bid.class
                );
            });
        }
        Command::Bids { command } => match command {
            BidsCommand::List => {
                let list: Vec<BidView> = client.get("/v1/bids").await?;
                print(json, &list, || show_bids(&list));
            }
            BidsCommand::Show { id } => {
                let b: BidView = client.get(&format!("/v1/bids/{id}")).await?;
                print(json, &b, || show_bids(std::slice::from_ref(&b)));
            }
            BidsCommand::Cancel { id } => {
                let b: BidView = client.post_empty(&format!("/v1/bids/{id}/cancel")).await?;
                print(json, &b, || {
                    println!("bid {id} cancelled; the hosts it held are released");
                });
            }
        },
        Command::Spot { command } => {
            let v: SpotView = match command {
                SpotCommand::Show { listing } => client.get(&format!("/v1/spot/{listing}")).await?,
                SpotCommand::Clear { listing } => {
                    client
                        .post_empty(&format!("/v1/spot/{listing}/clear"))
                        .await?
                }
            };
            print(json, &v, || show_spot(&v));
        }
        Command::Auctions { command } => match command {
            AuctionsCommand::List { listing, open } => {
                let q = query(&[
                    ("listing", listing),
                    ("open", open.then(|| "true".to_owned())),
                ]);
                let list: Vec<AuctionView> = client.get(&format!("/v1/auctions?{q}")).await?;
                print(json, &list, || show_auctions(&list));
            }
            AuctionsCommand::Show { id } => {
                let a: AuctionView = client.get(&format!("/v1/auctions/{id}")).await?;
                print(json, &a, || show_auction(&a));
            }
            AuctionsCommand::Create(args) => {
                let body = AuctionRequest {
                    kind: auction_kind(&args)?,
                    listing: args.listing,
                    starts_at_ms: None,
                    ends_at_ms: now_ms().saturating_add(
                        i64::try_from(args.ends_in)
                            .unwrap_or(i64::MAX)
                            .saturating_mul(1000),
                    ),
                    term_hours: args.term_hours,
                };
                let a: AuctionView = client.post("/v1/auctions", &body).await?;
                print(json, &a, || show_auction(&a));
            }
            AuctionsCommand::Bid {
                id,
                amount,
                client_token,
            } => {
                let body = AuctionBidRequest {
                    amount,
                    client_token,
                };
                let a: AuctionView = client
                    .post(&format!("/v1/auctions/{id}/bids"), &body)
                    .await?;
                print(json, &a, || show_auction(&a));
            }
        },
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

fn show_bids(list: &[BidView]) {
    let mut t = table(&[
        "ID",
        "LISTING",
        "MAX/H",
        "QUANTITY",
        "ALL-OR-NOTHING",
        "PLACED",
        "STATE",
        "ALLOCATED",
        "HOSTS HELD",
    ]);
    let now = now_ms();
    for v in list {
        let b = &v.bid;
        t.add_row([
            b.id.to_string(),
            b.class.clone(),
            b.max_price.to_string(),
            b.quantity.to_string(),
            if b.all_or_nothing { "yes" } else { "no" }.to_string(),
            when(Some(b.placed_at_ms), now),
            v.state.clone(),
            v.allocated.to_string(),
            v.reservations.len().to_string(),
        ]);
    }
    println!("{t}");
}

fn show_spot(v: &SpotView) {
    let now = now_ms();
    println!("listing:        {}", v.listing);
    println!("minimum:        {} {} an hour", v.minimum, v.currency);
    println!("capacity:       {} host(s)", v.capacity);
    match v.price {
        Some(p) => println!(
            "last price:     {p} {} (cleared {})",
            v.currency,
            when(v.cleared_at_ms, now)
        ),
        None => println!("last price:     - (not cleared yet)"),
    }
    match v.next_clearing_at_ms {
        Some(t) => println!("next clearing:  {}", when(Some(t), now)),
        None => println!("next clearing:  at the first bid"),
    }
    match &v.guidance {
        Some(g) => println!(
            "recently won:   {} to {} (median {}, {} prices)",
            g.low, g.high, g.median, g.count
        ),
        None => println!("recently won:   nothing"),
    }
}

fn show_auctions(list: &[AuctionView]) {
    let mut t = table(&[
        "ID", "LISTING", "TYPE", "PHASE", "ENDS", "PRICE", "BIDS", "WINNER",
    ]);
    let now = now_ms();
    for v in list {
        let a = &v.auction;
        t.add_row([
            v.id.to_string(),
            v.listing.clone(),
            auction_type(&a.kind).to_owned(),
            name_of(&a.phase),
            when(Some(a.ends_at_ms), now),
            a.current_price
                .map_or("-".into(), |p| format!("{p} {}", v.currency)),
            a.bid_count.to_string(),
            a.outcome
                .as_ref()
                .and_then(|o| o.winner.as_ref())
                .map_or("-".into(), |w| format!("{} at {}", w.bidder, w.price)),
        ]);
    }
    println!("{t}");
}

fn auction_type(kind: &AuctionKind) -> &'static str {
    match kind {
        AuctionKind::English { .. } => "english",
        AuctionKind::Dutch { .. } => "dutch",
        AuctionKind::SealedFirst { .. } => "sealed_first",
        AuctionKind::SealedSecond { .. } => "sealed_second",
    }
}

fn show_auction(v: &AuctionView) {
    let now = now_ms();
    let a = &v.auction;
    println!("auction:        {} ({})", v.id, auction_type(&a.kind));
    println!("listing:        {} of {}", v.listing, v.provider);
    println!("phase:          {}", name_of(&a.phase));
    println!("ends:           {}", when(Some(a.ends_at_ms), now));
    if let Some(p) = a.current_price {
        println!("price now:      {p} {}", v.currency);
    }
    if let Some(p) = a.lowest_acceptable {
        println!("lowest bid now: {p} {}", v.currency);
    }
    println!("bids:           {}", a.bid_count);
    for b in &a.bids {
        println!(
            "  {} {} {} {}",
            when(Some(b.at_ms), now),
            b.bidder,
            b.amount,
            v.currency
        );
    }
    if let Some(o) = &a.outcome {
        match &o.winner {
            Some(w) => println!(
                "outcome:        {} won at {} {} ({})",
                w.bidder,
                w.price,
                v.currency,
                name_of(&o.reason)
            ),
            None => println!("outcome:        no sale"),
        }
    }
    if let Some(r) = v.reservation {
        println!("reservation:    {r}");
    }
}
