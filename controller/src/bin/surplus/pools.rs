//! `surplus pools ...`: private pools. A pool owner makes a pool from slots its
//! accounts hold, names its members and issues them credits; a member bids for
//! slots and runs instances on the hosts it is given.

use clap::Subcommand;
use surplus_api::pools::{
    BurstSettings, CreditRequest, CreditView, CurrencyKind, ExplainView, InviteRequest,
    JoinRequest, LimitsRequest, MemberRequest, PoolAccountGrant, PoolBidRequest, PoolCreate,
    PoolRequestView, PoolSettingsBody, PoolUsageView, PoolView, RebidRequest, RequestType, Right,
    SlotRequest,
};

use crate::client::{Client, now_ms, print, table, when};

#[derive(Subcommand)]
pub enum Command {
    /// Your pools (owner), or those you are a member of.
    List,
    /// One pool: its settings, slots (and who holds each) and members.
    Show {
        /// The pool.
        id: uuid::Uuid,
    },
    /// (pool owner) Make a pool.
    Create(Box<CreateArgs>),
    /// (pool owner) Change a pool's settings; what is left out stays.
    Policy {
        /// The pool.
        id: uuid::Uuid,
        #[command(flatten)]
        settings: Box<SettingsArgs>,
    },
    /// (pool owner) Put a slot in a pool: a reservation one of your accounts holds,
    /// or a host one of them provides.
    AddSlot {
        /// The pool.
        id: uuid::Uuid,
        /// The reservation's id or the host's.
        slot: uuid::Uuid,
    },
    /// (pool owner) Take a slot back: its holder keeps it for the notice period.
    RemoveSlot {
        /// The pool.
        id: uuid::Uuid,
        /// The slot.
        slot: uuid::Uuid,
    },
    /// (pool owner) Let a client account in.
    AddMember {
        /// The pool.
        id: uuid::Uuid,
        /// The member's client account.
        member: String,
        /// Its name.
        #[arg(long)]
        name: Option<String>,
        /// Its organisation.
        #[arg(long)]
        organisation: Option<String>,
    },
    /// (pool owner) Remove a member: its slots end after the notice period.
    RemoveMember {
        /// The pool.
        id: uuid::Uuid,
        /// The member.
        member: String,
    },
    /// (pool owner) Issue the pool's credits (or units) to a member.
    Credit {
        /// The pool.
        id: uuid::Uuid,
        /// The member.
        #[arg(long)]
        user: String,
        /// Minor units of the pool's currency.
        #[arg(long)]
        amount: i64,
        /// Makes a retry safe: one token, one issue.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// (client) Let a pool owner put the capacity you hold in its pools, and pay its
    /// bursts from this account.
    Grant {
        /// The pool owner account.
        owner: String,
    },
    /// (member) Ask for slots at a bid per slot-hour; the next cycle decides.
    Request {
        /// The pool.
        id: uuid::Uuid,
        /// Slots wanted.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The bid per slot-hour, in the pool's currency.
        #[arg(long)]
        bid: u64,
        /// Makes a retry safe.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// A pool's requests (a member's own), with what the last cycle decided.
    Requests {
        /// The pool.
        id: uuid::Uuid,
    },
    /// (member) Change a request's bid.
    Rebid {
        /// The request.
        request: uuid::Uuid,
        /// The new bid per slot-hour.
        #[arg(long)]
        bid: u64,
    },
    /// (member) Cancel a request: its slots end after the notice period.
    Cancel {
        /// The request.
        request: uuid::Uuid,
    },
    /// Why a request holds, waits or was preempted.
    Explain {
        /// The request.
        request: uuid::Uuid,
    },
    /// Usage and charges per member, and the bursts.
    Usage {
        /// The pool.
        id: uuid::Uuid,
    },
    /// (pool owner) Run a pool's cycle now.
    Cycle {
        /// The pool.
        id: uuid::Uuid,
    },
    /// (pool owner) Invite another pool owner into a merged pool, with its rights.
    Invite {
        /// The pool.
        id: uuid::Uuid,
        /// The pool owner account invited.
        entity: String,
        /// What it may change: policy, users, slots, dissolve (comma separated).
        #[arg(long, value_delimiter = ',')]
        rights: Vec<String>,
    },
    /// (pool owner) Merge your own pool into a pool you were invited into.
    Join {
        /// The merged pool.
        id: uuid::Uuid,
        /// Your pool, whose slots, members and requests move.
        #[arg(long)]
        pool: uuid::Uuid,
        /// The most of your slots lent to others' users at once.
        #[arg(long)]
        lending_limit: Option<u32>,
        /// The most others' slots your users borrow at once.
        #[arg(long)]
        borrowing_limit: Option<u32>,
    },
    /// (pool owner) Set your lending and borrowing limits in a merged pool.
    Limits {
        /// The merged pool.
        id: uuid::Uuid,
        /// The most of your slots lent to others' users at once (none: no bound).
        #[arg(long)]
        lending_limit: Option<u32>,
        /// The most others' slots your users borrow at once (none: no bound).
        #[arg(long)]
        borrowing_limit: Option<u32>,
    },
    /// (pool owner) Leave a merged pool: your slots come back after the notice.
    Leave {
        /// The merged pool.
        id: uuid::Uuid,
    },
    /// (pool owner) Dissolve a pool: requests end now, slots after the notice.
    Dissolve {
        /// The pool.
        id: uuid::Uuid,
    },
}

/// `surplus pools create`.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// A name for people.
    pub name: String,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

/// A pool's settings on the command line.
#[derive(clap::Args)]
pub struct SettingsArgs {
    /// auction (bids, the default) or fixed_price (everyone pays the minimum).
    #[arg(long)]
    pub request_type: Option<String>,
    /// The ledger currency of bids and charges (required to create).
    #[arg(long)]
    pub currency: Option<String>,
    /// money, credits or units.
    #[arg(long)]
    pub currency_kind: Option<String>,
    /// english, dutch or spot.
    #[arg(long)]
    pub method: Option<String>,
    /// Dutch: the asking price's step per cycle.
    #[arg(long)]
    pub step: Option<u64>,
    /// The least a bid may be per slot-hour.
    #[arg(long)]
    pub minimum: Option<u64>,
    /// The most a bid may be per slot-hour.
    #[arg(long)]
    pub maximum: Option<u64>,
    /// The most slots one member holds.
    #[arg(long)]
    pub cap_per_user: Option<u32>,
    /// A cycle may take slots from a holder outbid.
    #[arg(long)]
    pub preemptible: Option<bool>,
    /// Seconds between cycles.
    #[arg(long)]
    pub cycle_seconds: Option<u64>,
    /// Seconds a member keeps a slot it lost.
    #[arg(long)]
    pub notice_seconds: Option<u64>,
    /// Hours for a member's usage to count half in the rank.
    #[arg(long)]
    pub half_life_hours: Option<u64>,
    /// The most members.
    #[arg(long)]
    pub max_users: Option<u32>,
    /// Burst: the client account that holds and pays for what is burst into.
    #[arg(long)]
    pub burst_account: Option<String>,
    /// Burst: the most paid per host-hour.
    #[arg(long)]
    pub burst_max_price: Option<u64>,
    /// Burst: the most spent per period.
    #[arg(long)]
    pub burst_budget: Option<u64>,
    /// Burst: the currency it is paid in.
    #[arg(long)]
    pub burst_currency: Option<String>,
    /// Burst: the budget period in hours.
    #[arg(long, default_value_t = 24)]
    pub burst_period_hours: u64,
    /// Burst: the least hours a burst is kept.
    #[arg(long, default_value_t = 1)]
    pub burst_min_hours: u32,
    /// Remove the burst policy (`pools policy`).
    #[arg(long)]
    pub no_burst: bool,
}

impl SettingsArgs {
    fn body(self) -> anyhow::Result<PoolSettingsBody> {
        let currency_kind = match self.currency_kind.as_deref() {
            None => None,
            Some("money") => Some(CurrencyKind::Money),
            Some("credits") => Some(CurrencyKind::Credits),
            Some("units") => Some(CurrencyKind::Units),
            Some(other) => anyhow::bail!("--currency-kind {other:?}: money, credits or units"),
        };
        let burst = match (self.burst_account, self.burst_max_price, self.burst_budget) {
            (None, None, None) => None,
            (Some(account), Some(max_price), Some(budget)) => Some(BurstSettings {
                currency: self
                    .burst_currency
                    .or_else(|| self.currency.clone())
                    .ok_or_else(|| anyhow::anyhow!("--burst-currency is needed"))?,
                account,
                max_price,
                budget,
                period_ms: i64::try_from(self.burst_period_hours)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(3_600_000),
                min_hours: self.burst_min_hours,
            }),
            _ => anyhow::bail!(
                "a burst policy needs --burst-account, --burst-max-price and --burst-budget"
            ),
        };
        let request_type = match self.request_type.as_deref() {
            None => None,
            Some("auction") => Some(RequestType::Auction),
            Some("fixed_price") => Some(RequestType::FixedPrice),
            Some(other) => anyhow::bail!("--request-type {other:?}: auction or fixed_price"),
        };
        Ok(PoolSettingsBody {
            remove_burst: self.no_burst.then_some(true),
            name: None,
            request_type,
            minimum: self.minimum,
            maximum: self.maximum,
            cap_per_user: self.cap_per_user,
            preemptible: self.preemptible,
            method: self.method,
            step: self.step,
            currency: self.currency,
            currency_kind,
            cycle_seconds: self.cycle_seconds,
            notice_seconds: self.notice_seconds,
            half_life_hours: self.half_life_hours,
            max_users: self.max_users,
            burst,
        })
    }
}

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List => {
            let list: Vec<PoolView> = client.get("/v1/pools").await?;
            print(json, &list, || show_pools(&list));
        }
        Command::Show { id } => {
            let p: PoolView = client.get(&format!("/v1/pools/{id}")).await?;
            print(json, &p, || show_pool(&p));
        }
        Command::Create(args) => {
            let args = *args;
            let body = PoolCreate {
                name: Some(args.name),
                ..args.settings.body()?
            };
            let p: PoolView = client.post("/v1/pools", &body).await?;
            print(json, &p, || show_pool(&p));
        }
        Command::Policy { id, settings } => {
            let p: PoolView = client
                .put(&format!("/v1/pools/{id}/policy"), &settings.body()?)
                .await?;
            print(json, &p, || show_pool(&p));
        }
        Command::AddSlot { id, slot } => {
            let p: PoolView = client
                .post(&format!("/v1/pools/{id}/slots"), &SlotRequest { slot })
                .await?;
            print(json, &p, || show_pool(&p));
        }
        Command::RemoveSlot { id, slot } => {
            let p: PoolView = client
                .delete(&format!("/v1/pools/{id}/slots/{slot}"))
                .await?;
            print(json, &p, || show_pool(&p));
        }
        Command::AddMember {
            id,
            member,
            name,
            organisation,
        } => {
            let body = MemberRequest {
                member,
                name,
                organisation,
            };
            let p: PoolView = client
                .post(&format!("/v1/pools/{id}/members"), &body)
                .await?;
            print(json, &p, || show_pool(&p));
        }
        Command::RemoveMember { id, member } => {
            let p: PoolView = client
                .delete(&format!("/v1/pools/{id}/members/{member}"))
                .await?;
            print(json, &p, || show_pool(&p));
        }
        Command::Credit {
            id,
            user,
            amount,
            client_token,
        } => {
            let body = CreditRequest {
                member: user,
                amount,
                client_token,
            };
            let c: CreditView = client
                .post(&format!("/v1/pools/{id}/credits"), &body)
                .await?;
            print(json, &c, || {
                println!(
                    "{} {} {} to {} ({})",
                    c.applied, c.amount, c.currency, c.member, c.key
                )
            });
        }
        Command::Grant { owner } => {
            let _: serde_json::Value = client
                .post(
                    "/v1/pool-accounts",
                    &PoolAccountGrant {
                        owner: owner.clone(),
                    },
                )
                .await?;
            print(json, &serde_json::json!({"granted": owner}), || {
                println!("{owner} may pool the capacity this account holds")
            });
        }
        Command::Request {
            id,
            count,
            bid,
            client_token,
        } => {
            let body = PoolBidRequest {
                count,
                bid,
                client_token,
            };
            let r: PoolRequestView = client
                .post(&format!("/v1/pools/{id}/requests"), &body)
                .await?;
            print(json, &r, || show_requests(std::slice::from_ref(&r)));
        }
        Command::Requests { id } => {
            let list: Vec<PoolRequestView> =
                client.get(&format!("/v1/pools/{id}/requests")).await?;
            print(json, &list, || show_requests(&list));
        }
        Command::Rebid { request, bid } => {
            let r: PoolRequestView = client
                .post(
                    &format!("/v1/pool-requests/{request}/bid"),
                    &RebidRequest { bid },
                )
                .await?;
            print(json, &r, || show_requests(std::slice::from_ref(&r)));
        }
        Command::Cancel { request } => {
            let r: PoolRequestView = client
                .post_empty(&format!("/v1/pool-requests/{request}/cancel"))
                .await?;
            print(json, &r, || show_requests(std::slice::from_ref(&r)));
        }
        Command::Explain { request } => {
            let e: ExplainView = client
                .get(&format!("/v1/pool-requests/{request}/explain"))
                .await?;
            print(json, &e, || println!("{}: {}", e.rule, e.explanation));
        }
        Command::Usage { id } => {
            let u: PoolUsageView = client.get(&format!("/v1/pools/{id}/usage")).await?;
            print(json, &u, || show_usage(&u));
        }
        Command::Cycle { id } => {
            let p: PoolView = client.post_empty(&format!("/v1/pools/{id}/cycle")).await?;
            print(json, &p, || show_pool(&p));
        }
        Command::Invite { id, entity, rights } => {
            let rights = rights
                .iter()
                .map(|r| {
                    serde_json::from_value::<Right>(serde_json::json!(r)).map_err(|_| {
                        anyhow::anyhow!("--rights {r:?}: policy, users, slots or dissolve")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let p: PoolView = client
                .post(
                    &format!("/v1/pools/{id}/entities"),
                    &InviteRequest { entity, rights },
                )
                .await?;
            print(json, &p, || show_pool(&p));
        }
        Command::Join {
            id,
            pool,
            lending_limit,
            borrowing_limit,
        } => {
            let body = JoinRequest {
                pool,
                lending_limit,
                borrowing_limit,
            };
            let p: PoolView = client.post(&format!("/v1/pools/{id}/join"), &body).await?;
            print(json, &p, || show_pool(&p));
        }
        Command::Limits {
            id,
            lending_limit,
            borrowing_limit,
        } => {
            let body = LimitsRequest {
                lending_limit,
                borrowing_limit,
            };
            let p: PoolView = client.put(&format!("/v1/pools/{id}/limits"), &body).await?;
            print(json, &p, || show_pool(&p));
        }
        Command::Leave { id } => {
            let p: PoolView = client.post_empty(&format!("/v1/pools/{id}/leave")).await?;
            print(json, &p, || show_pool(&p));
        }
        Command::Dissolve { id } => {
            let p: PoolView = client.delete(&format!("/v1/pools/{id}")).await?;
            print(json, &p, || show_pool(&p));
        }
    }
    Ok(())
}

fn method_name(p: &PoolView) -> String {
    if p.settings.request_type == RequestType::FixedPrice {
        return "fixed price".into();
    }
    match p.settings.method {
        surplus_api::pools::Method::English => "english".into(),
        surplus_api::pools::Method::Dutch { step } => format!("dutch (step {step})"),
        surplus_api::pools::Method::Spot => "spot".into(),
        surplus_api::pools::Method::Fixed => "fixed".into(),
    }
}

fn show_pools(list: &[PoolView]) {
    let mut t = table(&[
        "ID", "NAME", "OWNER", "METHOD", "CURRENCY", "SLOTS", "MEMBERS",
    ]);
    for p in list {
        t.add_row([
            p.id.to_string(),
            p.name.clone(),
            p.owner.clone(),
            method_name(p),
            p.settings.currency.clone(),
            p.slots.len().to_string(),
            p.members.len().to_string(),
        ]);
    }
    println!("{t}");
}

fn show_pool(p: &PoolView) {
    let now = now_ms();
    let s = &p.settings;
    println!("{} ({}), owner {}", p.name, p.id, p.owner);
    println!(
        "  {} in {}; bids {}..{} per slot-hour; cap {}; {}preemptible",
        method_name(p),
        s.currency,
        s.policy.minimum,
        s.policy.maximum.map_or("-".into(), |m| m.to_string()),
        s.policy.cap_per_user.map_or("-".into(), |c| c.to_string()),
        if s.policy.preemptible { "" } else { "not " },
    );
    println!(
        "  cycle every {} s (next {}), notice {} s; burst: {}",
        s.cycle_ms / 1000,
        when(Some(p.next_cycle_at_ms), now),
        s.notice_ms / 1000,
        s.burst.as_ref().map_or("none".into(), |b| format!(
            "up to {} {} per host-hour, budget {} per {} h, paid by {}",
            b.max_price,
            b.currency,
            b.budget,
            b.period_ms / 3_600_000,
            b.account
        )),
    );
    let mut t = table(&[
        "SLOT", "KIND", "HOST", "ACCOUNT", "TYPE", "ZONE", "ENDS", "HELD BY",
    ]);
    for slot in &p.slots {
        t.add_row([
            slot.slot.to_string(),
            format!(
                "{}{}",
                slot.facts
                    .mode
                    .clone()
                    .unwrap_or_else(|| slot.facts.kind.clone()),
                if slot.burst { " (burst)" } else { "" }
            ),
            slot.host.to_string(),
            slot.account.clone(),
            slot.facts
                .instance_type
                .clone()
                .unwrap_or_else(|| "-".into()),
            slot.facts.zone.clone().unwrap_or_else(|| "-".into()),
            when(slot.leaving_at_ms.or(slot.facts.until_ms), now),
            slot.held_by.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
    let mut t = table(&["MEMBER", "ENTITY", "NAME", "ORGANISATION"]);
    for m in &p.members {
        t.add_row([
            m.member.clone(),
            m.entity.clone(),
            m.name.clone(),
            m.organisation.clone(),
        ]);
    }
    println!("{t}");
    if !p.entities.is_empty() {
        let mut t = table(&[
            "ENTITY",
            "RIGHTS",
            "LENDS AT MOST",
            "BORROWS AT MOST",
            "STATE",
        ]);
        let limit = |l: Option<u32>| l.map_or("-".into(), |l| l.to_string());
        for e in &p.entities {
            t.add_row([
                e.entity.clone(),
                e.rights
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                limit(e.lending_limit),
                limit(e.borrowing_limit),
                match (e.joined_at_ms, e.leaving_at_ms) {
                    (_, Some(at)) => format!("leaving {}", when(Some(at), now)),
                    (Some(_), None) => "joined".into(),
                    (None, None) => "invited".into(),
                },
            ]);
        }
        println!("{t}");
    }
}

fn show_requests(list: &[PoolRequestView]) {
    let mut t = table(&[
        "REQUEST", "MEMBER", "COUNT", "BID", "STATE", "DECIDED", "HOSTS",
    ]);
    for r in list {
        t.add_row([
            r.request.id.to_string(),
            r.request.user.clone(),
            r.request.count.to_string(),
            r.request.bid.to_string(),
            r.state.clone(),
            r.why
                .as_ref()
                .and_then(|w| w["rule"].as_str())
                .unwrap_or("-")
                .to_owned(),
            r.allocations
                .iter()
                .map(|a| a.host.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    println!("{t}");
}

fn show_usage(u: &PoolUsageView) {
    let mut t = table(&["MEMBER", "SLOT-HOURS", "CHARGED", "HOLDING"]);
    for m in &u.members {
        t.add_row([
            m.member.clone(),
            format!("{:.3}", m.slot_hours),
            format!("{} {}", m.charged, u.currency),
            m.holding
                .iter()
                .map(|h| format!("{} ({} instances)", h.host, h.instances.len()))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    println!("{t}");
    println!("total charged: {} {}", u.total, u.currency);
    if !u.bursts.is_empty() {
        let mut t = table(&["BURST SLOT", "SOURCE", "PRICE", "STARTED", "ENDED"]);
        let now = now_ms();
        for b in &u.bursts {
            t.add_row([
                b.slot.to_string(),
                b.source.clone(),
                b.price.to_string(),
                when(Some(b.started_at_ms), now),
                when(b.ended_at_ms, now),
            ]);
        }
        println!("{t}");
        println!("burst spent this period: {}", u.burst_spent);
    }
}
