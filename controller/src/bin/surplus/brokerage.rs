//! `surplus subscriptions` and `surplus brokerage`: subscribers' limits and the
//! margins over and under them across users and clouds (issue 18).

use clap::Subcommand;
use surplus_api::brokerage::{
    BillRequest, BillView, BundlePlanRequest, BundlePlanView, BundleView, MarginsView,
    SubscriptionCreate, SubscriptionView, TenderRequest, TenderView,
};
use surplus_market::stagger::IntervalRule;
use surplus_market::tender::{ResourceTerms, Terms};

use crate::client::{Client, print, table};

/// `surplus subscriptions`.
#[derive(Subcommand)]
pub enum SubscriptionCommand {
    /// Make or replace a user's subscription of a resource (admin).
    Create {
        /// The user.
        #[arg(long)]
        user: String,
        /// os_instances, cpu_cores, memory_gb or app.<name>.
        #[arg(long)]
        resource: String,
        /// The short-term period: 1m, 5m, 10m, 15m, 30m, 1h, 8h, 12h or 24h.
        #[arg(long)]
        period: String,
        /// Units per period without overage.
        #[arg(long)]
        limit: u64,
        /// Minor units per unit over the limit per period.
        #[arg(long)]
        overage_rate: i64,
        /// The client account billed the netted overage (default: the user).
        #[arg(long)]
        administrator: Option<String>,
        /// The rate's currency (default EUR).
        #[arg(long)]
        currency: Option<String>,
        /// When the user's unused capacity may be contributed, every day (UTC), such
        /// as 09:00-17:00; repeat for more windows (default: at any time).
        #[arg(long = "availability")]
        availability: Vec<String>,
    },
    /// Every subscription (admin).
    List,
    /// One user's subscriptions (admin).
    Show {
        /// The user.
        user: String,
    },
}

/// `surplus brokerage`.
#[derive(Subcommand)]
pub enum BrokerageCommand {
    /// The margins of a window, laid out like FIG. 4: each user's usage across clouds
    /// against its limit per period, the net margin across users and clouds, the
    /// offset cost, and the totals (admin).
    Margins {
        /// Only this user's subscriptions (netted across its clouds only).
        #[arg(long)]
        user: Option<String>,
        /// Only this resource.
        #[arg(long)]
        resource: Option<String>,
        /// Only subscriptions of this period (15m, 1h, ...).
        #[arg(long)]
        period: Option<String>,
        /// Window start, ms since the epoch (default: a day before --until).
        #[arg(long)]
        from: Option<i64>,
        /// Window end, ms since the epoch (default: the end of the last whole period).
        #[arg(long)]
        until: Option<i64>,
    },
    /// Post the netted overage of a window of whole periods through the ledger and
    /// notify each subscriber's administrator; once per record and window (admin).
    Bill {
        /// Window start, ms since the epoch.
        #[arg(long)]
        from: i64,
        /// Window end, ms since the epoch.
        #[arg(long)]
        until: i64,
        /// Only subscriptions of this period (15m, 1h, ...).
        #[arg(long)]
        period: Option<String>,
        /// Only this resource.
        #[arg(long)]
        resource: Option<String>,
    },
    /// Bundles of the subscribers' unused capacity.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// The tenders this controller sent (out) and answered (in), newest first (admin).
    Tenders,
    /// The terms by which this controller answers tenders, as a marketplace cloud.
    Terms {
        #[command(subcommand)]
        command: TermsCommand,
    },
}

/// `surplus brokerage bundle`.
#[derive(Subcommand)]
pub enum BundleCommand {
    /// Plan a bundle holding an amount over an interval from the subscribers'
    /// estimated contributions, staggered; shows who contributes what, when, and the
    /// price, or where it falls short (admin). Nothing is stored.
    Plan(PlanArgs),
    /// Plan a bundle and tender it to marketplace clouds, one after another, each
    /// offered what the ones before it left; shows each answer (admin). At the
    /// interval's end the accepted tenders are paid out to the contributors.
    Tender {
        #[command(flatten)]
        plan: PlanArgs,
        /// A marketplace cloud (peer controller id); repeat for more, in order.
        #[arg(long = "cloud", required = true)]
        clouds: Vec<String>,
        /// The price's currency (default EUR).
        #[arg(long)]
        currency: Option<String>,
    },
    /// The bundles tendered, with their tenders and whether they were paid out (admin).
    List,
}

/// What a bundle holds, and how it is estimated and priced.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// The resource, such as os_instances.
    #[arg(long)]
    resource: String,
    /// Units held at every instant.
    #[arg(long)]
    amount: u64,
    /// The interval's start, ms since the epoch.
    #[arg(long)]
    from: i64,
    /// The interval's end, ms since the epoch (or --interval).
    #[arg(
        long,
        required_unless_present = "interval",
        conflicts_with = "interval"
    )]
    until: Option<i64>,
    /// The interval's length instead of --until: `common` (the least common multiple
    /// of the subscribers' periods), `fixed:1h` (1h, 2h, 12h or 24h) or
    /// `requested:45m` (what a marketplace cloud asked for).
    #[arg(long, value_parser = parse_interval)]
    interval: Option<IntervalRule>,
    /// Also cut the interval into the longest intervals each holding this many units.
    #[arg(long)]
    hold_minimum: Option<u64>,
    /// Share of the average under-consumption estimated, basis points (5000 = 50%).
    #[arg(long)]
    share_bps: Option<u32>,
    /// How far back the estimates look, such as 48h.
    #[arg(long)]
    history: Option<String>,
    /// Minor units per unit-hour.
    #[arg(long)]
    rate: Option<u64>,
    /// The least a contributor is paid.
    #[arg(long)]
    floor: Option<u64>,
}

impl PlanArgs {
    fn request(self) -> BundlePlanRequest {
        BundlePlanRequest {
            resource: self.resource,
            amount: self.amount,
            from: self.from,
            until: self.until,
            interval: self.interval,
            hold_minimum: self.hold_minimum,
            share_bps: self.share_bps,
            history: self.history,
            rate_per_unit_hour: self.rate,
            floor_per_contributor: self.floor,
        }
    }
}

/// Reads `common`, `fixed:1h` or `requested:45m`.
fn parse_interval(text: &str) -> Result<IntervalRule, String> {
    let ms = |d: &str| {
        humantime::parse_duration(d)
            .ok()
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .ok_or_else(|| format!("{d:?} is not a duration such as 1h"))
    };
    match text.split_once(':') {
        None if text == "common" => Ok(IntervalRule::Common),
        Some(("fixed", d)) => Ok(IntervalRule::Fixed(ms(d)?)),
        Some(("requested", d)) => Ok(IntervalRule::Requested(ms(d)?)),
        _ => Err(format!(
            "{text:?}: common, fixed:<1h|2h|12h|24h> or requested:<duration>"
        )),
    }
}

/// `surplus brokerage terms`.
#[derive(Subcommand)]
pub enum TermsCommand {
    /// This controller's standing terms for tenders, as a marketplace cloud (admin).
    Show,
    /// Buy a resource from tenders: at most a rate per unit-hour and an amount per
    /// tender (replaces that resource's terms; admin).
    Set {
        /// The resource, such as cpu_cores.
        #[arg(long)]
        resource: String,
        /// The most paid per unit-hour, minor units.
        #[arg(long)]
        max_rate: u64,
        /// The most units taken of one tender.
        #[arg(long)]
        max_amount: u64,
        /// The currency paid in (replaces the terms' currency).
        #[arg(long)]
        currency: Option<String>,
    },
    /// Stop buying a resource from tenders (admin).
    Remove {
        /// The resource.
        #[arg(long)]
        resource: String,
    },
}

pub async fn subscriptions(
    client: &Client,
    json: bool,
    command: SubscriptionCommand,
) -> anyhow::Result<()> {
    let subs: Vec<SubscriptionView> = match command {
        SubscriptionCommand::Create {
            user,
            resource,
            period,
            limit,
            overage_rate,
            administrator,
            currency,
            availability,
        } => {
            let body = SubscriptionCreate {
                user,
                resource,
                period,
                limit,
                overage_rate,
                administrator,
                currency,
                availability: (!availability.is_empty()).then_some(availability),
            };
            let made: SubscriptionView = client.post("/v1/subscriptions", &body).await?;
            if json {
                print(json, &made, || {});
                return Ok(());
            }
            vec![made]
        }
        SubscriptionCommand::List => client.get("/v1/subscriptions").await?,
        SubscriptionCommand::Show { user } => {
            let path: String = form_urlencoded::byte_serialize(user.as_bytes()).collect();
            client.get(&format!("/v1/subscriptions/{path}")).await?
        }
    };
    print(json, &subs, || {
        let mut t = table(&[
            "USER",
            "RESOURCE",
            "PERIOD",
            "LIMIT",
            "OVERAGE RATE",
            "ADMINISTRATOR",
            "AVAILABLE (UTC)",
        ]);
        for s in &subs {
            t.add_row(vec![
                s.user.clone(),
                s.resource.clone(),
                s.period.clone(),
                s.limit.to_string(),
                format!("{} {}", s.overage_rate, s.currency),
                s.administrator.clone(),
                if s.availability.is_empty() {
                    "any time".to_owned()
                } else {
                    s.availability.join(", ")
                },
            ]);
        }
        println!("{t}");
    });
    Ok(())
}

pub async fn brokerage(
    client: &Client,
    json: bool,
    command: BrokerageCommand,
) -> anyhow::Result<()> {
    let (user, resource, period, from, until) = match command {
        BrokerageCommand::Margins {
            user,
            resource,
            period,
            from,
            until,
        } => (user, resource, period, from, until),
        BrokerageCommand::Bill {
            from,
            until,
            period,
            resource,
        } => {
            let body = BillRequest {
                from,
                until,
                period,
                resource,
            };
            let bills: Vec<BillView> = client.post("/v1/brokerage/bills", &body).await?;
            print(json, &bills, || {
                let mut t = table(&["ADMINISTRATOR", "RESOURCE", "OVER", "AMOUNT", "OUTCOME"]);
                for b in &bills {
                    t.add_row(vec![
                        b.administrator.clone(),
                        b.resource.clone(),
                        b.net_over.to_string(),
                        format!("{} {}", b.amount, b.currency),
                        b.outcome.clone(),
                    ]);
                }
                println!("{t}");
            });
            return Ok(());
        }
        BrokerageCommand::Bundle {
            command: BundleCommand::Plan(plan),
        } => {
            let plan: BundlePlanView = client
                .post("/v1/brokerage/bundles/plan", &plan.request())
                .await?;
            print(json, &plan, || show_plan(&plan));
            return Ok(());
        }
        BrokerageCommand::Bundle {
            command:
                BundleCommand::Tender {
                    plan,
                    clouds,
                    currency,
                },
        } => {
            let body = TenderRequest {
                bundle: plan.request(),
                clouds,
                currency,
            };
            let bundle: BundleView = client.post("/v1/brokerage/tenders", &body).await?;
            print(json, &bundle, || {
                show_bundles(std::slice::from_ref(&bundle))
            });
            return Ok(());
        }
        BrokerageCommand::Bundle {
            command: BundleCommand::List,
        } => {
            let bundles: Vec<BundleView> = client.get("/v1/brokerage/bundles").await?;
            print(json, &bundles, || show_bundles(&bundles));
            return Ok(());
        }
        BrokerageCommand::Tenders => {
            let tenders: Vec<TenderView> = client.get("/v1/brokerage/tenders").await?;
            print(json, &tenders, || show_tenders(&tenders));
            return Ok(());
        }
        BrokerageCommand::Terms { command } => {
            let mut terms: Terms = client.get("/v1/brokerage/tender-terms").await?;
            let changed = match command {
                TermsCommand::Show => false,
                TermsCommand::Set {
                    resource,
                    max_rate,
                    max_amount,
                    currency,
                } => {
                    terms.resources.insert(
                        resource,
                        ResourceTerms {
                            max_rate_per_unit_hour: max_rate,
                            max_amount,
                        },
                    );
                    if let Some(c) = currency {
                        terms.currency = c;
                    }
                    true
                }
                TermsCommand::Remove { resource } => {
                    if terms.resources.remove(&resource).is_none() {
                        anyhow::bail!("the terms do not buy {resource}");
                    }
                    true
                }
            };
            if changed {
                terms = client.put("/v1/brokerage/tender-terms", &terms).await?;
            }
            print(json, &terms, || {
                println!("currency {}", terms.currency);
                let mut t = table(&["RESOURCE", "MAX PER UNIT-HOUR", "MAX AMOUNT"]);
                for (r, rt) in &terms.resources {
                    t.add_row(vec![
                        r.clone(),
                        rt.max_rate_per_unit_hour.to_string(),
                        rt.max_amount.to_string(),
                    ]);
                }
                println!("{t}");
            });
            return Ok(());
        }
    };
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("user", user),
        ("resource", resource),
        ("period", period),
        ("from", from.map(|v| v.to_string())),
        ("until", until.map(|v| v.to_string())),
    ] {
        if let Some(v) = v {
            q.append_pair(k, &v);
        }
    }
    let view: MarginsView = client
        .get(&format!("/v1/brokerage/margins?{}", q.finish()))
        .await?;
    print(json, &view, || show_margins(&view));
    Ok(())
}

/// FIG. 4: a column per period; per user its usage and margin; then the net margin,
/// the offset cost and the excess capacity per period; the totals at the end. One
/// block per subscriber and resource.
fn show_margins(view: &MarginsView) {
    println!("clouds: {}", view.clouds.join(", "));
    for sub in &view.subscribers {
        for r in &sub.table.resources {
            println!(
                "\n{}: {} per {} ms, overage {} per unit over",
                sub.administrator, r.resource, r.period_ms, r.overage_rate
            );
            let mut header = vec!["".to_owned()];
            header.extend(r.periods.iter().map(|p| clock_label(*p)));
            header.push("TOTAL".into());
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            let mut t = table(&header);
            for u in &r.users {
                let mut row = vec![format!("{} (limit {})", u.user, u.limit)];
                row.extend(
                    u.cells
                        .iter()
                        .map(|c| format!("{} ({:+})", c.used, c.margin)),
                );
                row.push(format!("{:+}", u.marginal_total));
                t.add_row(row);
            }
            let mut net = vec!["net margin".to_owned()];
            net.extend(r.net_margins.iter().map(|m| format!("{m:+}")));
            net.push(format!("{:+}", r.marginal_total));
            t.add_row(net);
            let mut cost = vec!["offset cost".to_owned()];
            cost.extend(r.offset_costs.iter().map(i64::to_string));
            cost.push(r.aggregate_offset_cost.to_string());
            t.add_row(cost);
            let mut excess = vec!["excess capacity".to_owned()];
            excess.extend(r.excess_capacity.iter().map(u64::to_string));
            excess.push(r.excess_capacity.iter().sum::<u64>().to_string());
            t.add_row(excess);
            println!("{t}");
        }
        for b in &sub.billing {
            println!(
                "bill {}: {} {} ({} unit-periods over, netted)",
                b.administrator, b.resource, b.amount, b.net_over
            );
        }
    }
    if !view.unsubscribed.is_empty() {
        println!(
            "{} minutes of use by users without a subscription were left out",
            view.unsubscribed.len()
        );
    }
}

/// A bundle's arrangement as a timeline: who contributes what, when.
fn show_plan(plan: &BundlePlanView) {
    let mut t = table(&["CONTRIBUTOR", "ESTIMATE", "AVAILABLE FROM", "UNTIL"]);
    for e in &plan.estimates {
        t.add_row(vec![
            e.user.clone(),
            e.amount.to_string(),
            clock_label(e.from),
            clock_label(e.until),
        ]);
    }
    println!("{t}");
    if let Some(a) = &plan.arrangement {
        let mut t = table(&["CONTRIBUTOR", "AMOUNT", "FROM", "UNTIL", "PAID INCREMENTS"]);
        for c in &a.contributions {
            t.add_row(vec![
                c.contributor.clone(),
                c.amount.to_string(),
                clock_label(c.from),
                clock_label(c.until),
                c.paid_increments.to_string(),
            ]);
        }
        println!("{t}");
        if let Some(p) = &plan.price {
            println!(
                "price {} (per contributor: {:?})",
                p.total, p.per_contributor
            );
        }
    }
    for w in &plan.intervals {
        println!(
            "interval {}..{} holds the minimum",
            clock_label(w.from),
            clock_label(w.until)
        );
    }
    for s in &plan.shortfalls {
        println!(
            "short {}..{}: {} {} needed, {} available",
            clock_label(s.from),
            clock_label(s.until),
            s.needed,
            s.resource,
            s.available
        );
    }
}

fn show_tenders(tenders: &[TenderView]) {
    let mut t = table(&[
        "TENDER",
        "DIRECTION",
        "PEER",
        "RESOURCE",
        "OFFERED",
        "STATE",
        "TAKEN",
        "PRICE",
        "REASON",
    ]);
    for x in tenders {
        t.add_row(vec![
            x.id.clone(),
            x.direction.clone(),
            x.peer.clone(),
            x.resource.clone(),
            format!(
                "{} for {} {} ({}..{})",
                x.amount,
                x.offered_price,
                x.currency,
                clock_label(x.from_ms),
                clock_label(x.until_ms)
            ),
            x.state.clone(),
            x.accepted_amount.to_string(),
            x.price.to_string(),
            x.reason.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

fn show_bundles(bundles: &[BundleView]) {
    for b in bundles {
        println!(
            "bundle {}: {} {} {}..{}, price {} {}, placed {}{}",
            b.id,
            b.amount,
            b.resource,
            clock_label(b.from_ms),
            clock_label(b.until_ms),
            b.price,
            b.currency,
            b.placed,
            if b.settled_at_ms.is_some() {
                ", paid out"
            } else {
                ""
            }
        );
        show_tenders(&b.tenders);
    }
}

/// `HH:MM` (UTC) of a period's start.
fn clock_label(ms: i64) -> String {
    let minutes = ms.div_euclid(60_000).rem_euclid(24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}
