//! Buying capacity (issue 16): offers, quotes, reservations and the pricing history.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use surplus_market::auction::{
    Kind as AuctionKind, Outcome as AuctionOutcome, PublicView as AuctionPublic,
};
pub use surplus_market::history::{Bucket, Guidance, PricePoint};
pub use surplus_market::interrupt::Notice as InterruptNotice;
pub use surplus_market::offers::{ModePrice, Offer};
pub use surplus_market::quote::Quote;
pub use surplus_market::resell::PricingMode;
pub use surplus_market::reservations::{EndReason, Reservation, State as ReservationState};
pub use surplus_market::spot::Bid as SpotBid;

/// `POST /v1/quotes`: a price for one listing, held for a short time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct QuoteRequest {
    /// The listing to price.
    pub listing: String,
}

/// `POST /v1/reservations`: reserve hosts of a listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// The listing (from `GET /v1/offers`).
    pub listing: String,
    /// How to buy: `on_demand` (the listed hourly price until released), `immediate`
    /// (accepting a quote from `POST /v1/quotes`) or `reserved` (a long-term term:
    /// upfront fee plus a lower hourly rate). Spot and auctions are bids.
    pub mode: PricingMode,
    /// Hosts wanted (default 1): all of them or none.
    #[serde(default)]
    pub count: Option<u32>,
    /// The quote accepted (`immediate`).
    #[serde(default)]
    pub quote: Option<Uuid>,
    /// The term's length in hours (`reserved`; default the listing's offered term).
    #[serde(default)]
    pub term_hours: Option<u64>,
    /// Makes a retried request safe: the same token answers with the reservations it
    /// made the first time instead of reserving again.
    #[serde(default)]
    pub client_token: Option<String>,
}

/// How a holder reaches and uses a reserved host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostAccess {
    /// The host (its agent id): pass it as `agent_id` to RunInstances, or leave
    /// `agent_id` out while it is the only host held.
    pub host: Uuid,
    /// The host's availability zone.
    pub zone: String,
    /// Its host name.
    pub hostname: Option<String>,
    /// The address its agent last connected from.
    pub address: Option<String>,
    /// Where to control it: the control interface of this API.
    pub control_endpoint: String,
    /// Its size category, which the holder's instances there must fit.
    pub category: String,
    /// The category's CPUs.
    pub cores: Option<u32>,
    /// The category's memory, bytes.
    pub memory_bytes: Option<u64>,
}

/// A reservation with how to use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReservationView {
    /// The reservation.
    pub reservation: Reservation,
    /// The currency of its prices.
    pub currency: String,
    /// How to reach and control the host (while it holds it).
    pub access: Option<HostAccess>,
    /// Its notice of interruption, if one was given: why, and the deadline until
    /// which it keeps the host.
    #[serde(default)]
    pub interruption: Option<InterruptNotice>,
}

/// `POST /v1/reclaims`: a provider takes capacity back for its own customers
/// (fulfilment-based interruption). Reservations that allow it are given notice; at
/// the end of its grace each ends and its instances stop.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReclaimRequest {
    /// Only reservations on this host (all of them that allow it, unless `count`).
    #[serde(default)]
    pub host: Option<Uuid>,
    /// Only this listing's.
    #[serde(default)]
    pub listing: Option<String>,
    /// How many hosts to take back (default: 1, or every one on `host`).
    #[serde(default)]
    pub count: Option<u32>,
}

/// A reservation given notice of interruption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InterruptionView {
    /// The reservation.
    pub reservation: Uuid,
    /// Its listing.
    pub listing: String,
    /// The host taken back.
    pub host: Uuid,
    /// The notice: cause, grace and deadline.
    pub notice: InterruptNotice,
}

/// `POST /v1/bids`: a bid on a listing's spot market. The market clears every period
/// (and on demand) at one uniform price: the hosts go to the highest bids, and every
/// winner pays the highest losing bid or the provider minimum, whichever is higher.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BidRequest {
    /// The listing (it must sell `spot`).
    pub listing: String,
    /// The most it pays per host-hour, minor units (at least the provider minimum).
    pub max_price: u64,
    /// Hosts wanted (default 1).
    #[serde(default)]
    pub quantity: Option<u32>,
    /// Filled whole or not at all (default: it may be filled in part).
    #[serde(default)]
    pub all_or_nothing: bool,
    /// Makes a retried request safe: the same token answers with the bid it placed.
    #[serde(default)]
    pub client_token: Option<String>,
}

/// A spot bid as its bidder sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BidView {
    /// The bid (its `class` is its listing).
    pub bid: SpotBid,
    /// `live` or `cancelled`.
    pub state: String,
    /// When it was cancelled.
    pub cancelled_at_ms: Option<i64>,
    /// Hosts the last clearing gave it.
    pub allocated: u32,
    /// The reservations of the hosts it holds now (see `GET /v1/reservations/{id}`).
    pub reservations: Vec<Uuid>,
}

/// `GET /v1/spot/{listing}`: a listing's spot market.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpotView {
    /// The listing.
    pub listing: String,
    /// Its currency.
    pub currency: String,
    /// The provider minimum: the least a bid may be.
    pub minimum: u64,
    /// Hosts it sells now by spot (online, not held by other reservations).
    pub capacity: u32,
    /// The last clearing's price, if it cleared.
    pub price: Option<u64>,
    /// When it cleared last.
    pub cleared_at_ms: Option<i64>,
    /// When it clears next (periodically; sooner on demand).
    pub next_clearing_at_ms: Option<i64>,
    /// The period between clearings.
    pub period_ms: Option<i64>,
    /// The range of prices that won over the recent period.
    pub guidance: Option<Guidance>,
}

/// `POST /v1/auctions`: a provider (or an admin) sells one host of a listing by
/// auction: English (`reserve`, `increment`, optional `buy_now`), Dutch (`start`,
/// `decrement`, `every_ms`, `floor`), sealed first-price or sealed second-price
/// (`reserve`). Prices are per host-hour; the reserve or floor is at least the
/// provider minimum.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuctionRequest {
    /// The listing (it must sell `auction`).
    pub listing: String,
    /// The engine and its parameters.
    pub kind: AuctionKind,
    /// Opens at, Unix ms (default now).
    #[serde(default)]
    pub starts_at_ms: Option<i64>,
    /// Ends at, Unix ms (a bid at this instant is refused).
    pub ends_at_ms: i64,
    /// How long the winner holds the host, hours (default: until it releases it).
    #[serde(default)]
    pub term_hours: Option<u64>,
}

/// `POST /v1/auctions/{id}/bids`: a client's bid.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AuctionBidRequest {
    /// Per host-hour, minor units.
    pub amount: u64,
    /// Makes a retried request safe: the same token is the same bid.
    #[serde(default)]
    pub client_token: Option<String>,
}

/// An auction as anyone sees it: before the close of a sealed auction, no amount and
/// no bidder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuctionView {
    /// The auction.
    pub id: Uuid,
    /// The listing whose host it sells.
    pub listing: String,
    /// Its provider.
    pub provider: String,
    /// Its currency.
    pub currency: String,
    /// How long the winner holds the host (none: until released).
    pub term_ms: Option<i64>,
    /// Engine, phase, prices, bids (as the engine shows them now) and outcome.
    pub auction: AuctionPublic,
    /// The winner's reservation, once closed with a sale.
    pub reservation: Option<Uuid>,
    /// When it closed.
    pub closed_at_ms: Option<i64>,
}

/// `GET /v1/pricing/history`: the points asked for, a chart's series and the
/// guidance shown beside a bid form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PriceHistory {
    /// The prices, oldest first.
    pub points: Vec<PricePoint>,
    /// Per bucket of time: the least, greatest and last price (one currency).
    pub series: Vec<Bucket>,
    /// The range of prices that won over the recent period.
    pub guidance: Option<Guidance>,
}

/// The pricing history's chart as a standalone SVG document (the `surplus pricing
/// history --svg` file and the console's chart): per bucket a bar from its lowest to
/// its highest price and a line through the last prices, with the price axis from 0
/// to the highest price and the first and last bucket's dates. An empty series draws
/// the axes and says that nothing sold.
pub fn svg_chart(series: &[Bucket], currency: &str, title: &str) -> String {
    use std::fmt::Write;
    const W: f64 = 640.0;
    const H: f64 = 320.0;
    const LEFT: f64 = 64.0;
    const RIGHT: f64 = 16.0;
    const TOP: f64 = 32.0;
    const BOTTOM: f64 = 40.0;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let high = series.iter().map(|b| b.high).max().unwrap_or(0).max(1) as f64;
    let y = |p: u64| TOP + plot_h - (p as f64 / high) * plot_h;
    let step = plot_w / series.len().max(1) as f64;
    let x = |i: usize| LEFT + step * (i as f64 + 0.5);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{}"><title>{}</title>"##,
        escape(title),
        escape(title)
    );
    let _ = write!(
        svg,
        r##"<rect width="{W}" height="{H}" fill="#ffffff"/><text x="{LEFT}" y="20" font-family="sans-serif" font-size="14">{}</text>"##,
        escape(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="#444"/><line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#444"/>"##,
        TOP + plot_h,
        TOP + plot_h,
        LEFT + plot_w,
        TOP + plot_h
    );
    for (label, p) in [(high as u64, high as u64), (0, 0)] {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-family="sans-serif" font-size="11" text-anchor="end">{label} {}</text>"##,
            LEFT - 6.0,
            y(p) + 4.0,
            escape(currency)
        );
    }
    if series.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-family="sans-serif" font-size="13" text-anchor="middle">nothing sold in this period</text>"##,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    let bar = (step * 0.6).clamp(1.0, 24.0);
    for (i, b) in series.iter().enumerate() {
        let top = y(b.high);
        let height = (y(b.low) - top).max(1.0);
        let _ = write!(
            svg,
            r##"<rect class="range" x="{:.1}" y="{top:.1}" width="{bar:.1}" height="{height:.1}" fill="#9ecae1"><title>{}: {}-{} {} ({} sold)</title></rect>"##,
            x(i) - bar / 2.0,
            b.start_ms,
            b.low,
            b.high,
            escape(currency),
            b.count
        );
    }
    if !series.is_empty() {
        let points: Vec<String> = series
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{:.1},{:.1}", x(i), y(b.last)))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline class="last" fill="none" stroke="#08519c" stroke-width="2" points="{}"/>"##,
            points.join(" ")
        );
        for (i, label) in [
            (0, series[0].start_ms),
            (series.len() - 1, series[series.len() - 1].start_ms),
        ] {
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{}" font-family="sans-serif" font-size="11" text-anchor="middle">{}</text>"##,
                x(i),
                H - 16.0,
                day_of(label)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// `2026-12-07 14:00` (UTC) of a Unix ms instant.
fn day_of(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(start_ms: i64, low: u64, high: u64, last: u64) -> Bucket {
        Bucket {
            start_ms,
            low,
            high,
            last,
            count: 2,
        }
    }

    #[test]
    fn a_chart_draws_one_range_per_bucket_and_the_line_of_last_prices() {
        let svg = svg_chart(
            &[bucket(0, 10, 20, 15), bucket(3_600_000, 12, 40, 40)],
            "EUR",
            "spot <medium>",
        );
        assert!(svg.starts_with("<svg "), "{svg}");
        assert_eq!(svg.matches(r#"class="range""#).count(), 2);
        assert_eq!(svg.matches(r#"class="last""#).count(), 1);
        assert!(svg.contains("spot &lt;medium&gt;"), "the title is escaped");
        assert!(svg.contains("40 EUR"), "the axis tops at the highest price");
        assert!(svg.contains("1970-01-01 00:00") && svg.contains("1970-01-01 01:00"));
        // The highest price is drawn at the top of the plot, 0 at its bottom.
        assert!(svg.contains(r#"points="204.0,187.0 484.0,32.0""#), "{svg}");
    }

    #[test]
    fn an_empty_history_says_nothing_sold() {
        let svg = svg_chart(&[], "EUR", "history");
        assert!(svg.contains("nothing sold"));
        assert_eq!(svg.matches(r#"class="range""#).count(), 0);
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(day_of(1_796_652_000_000), "2026-12-07 14:00");
        assert_eq!(day_of(951_782_400_000), "2000-02-29 00:00");
    }
}
