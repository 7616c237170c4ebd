//! Usage charts: what hosts measured, per instance, host or account, by hour or day,
//! drawn on the server as SVG (axes and units labelled, readable without script).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::routing::get;
use maud::{Markup, html};
use surplus_market::records::UsageRow;
use surplus_protocol::clock::UnixMillis;

use super::view::{page, time};
use super::{Filled, Page, Signed};
use crate::app::Controller;
use crate::http::{Caller, billing};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new().route("/console/usage", get(usage))
}

/// Most charts on one page (the busiest subjects first).
const MAX_CHARTS: usize = 24;
/// Most buckets a chart shows (a window of about two weeks by hour, a year by day).
const MAX_BUCKETS: i64 = 400;

/// How a meter reads for people: a scale from its stored unit and the unit's name.
fn unit_of(meter: &str) -> (f64, &'static str) {
    use surplus_protocol::usage::meters::*;
    match meter {
        CPU_NS => (1e9, "CPU-seconds"),
        HOST_CPU_BUSY_MS | HOST_CPU_TOTAL_MS => (1e3, "CPU-seconds"),
        MEMORY_BYTE_MS => (1_048_576.0 * 3_600_000.0, "MiB-hours"),
        HOST_UPTIME_S => (1.0, "seconds"),
        m if m.ends_with("_bytes") => (1_048_576.0, "MiB"),
        m if m.ends_with("_ms") || m.starts_with(STATE_MS_PREFIX) => (1e3, "seconds"),
        _ => (1.0, "units"),
    }
}

/// A round number at or above `v` (1, 2 or 5 times a power of ten).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').to_owned()
    }
}

/// A bar chart of `values` (bucket start, value) over `from_ms..to_ms` in buckets of
/// `bucket_ms`, its y axis in `unit`.
pub fn bar_chart(
    title: &str,
    unit: &str,
    values: &[(UnixMillis, f64)],
    from_ms: UnixMillis,
    to_ms: UnixMillis,
    bucket_ms: i64,
) -> Markup {
    const W: f64 = 640.0;
    const H: f64 = 200.0;
    const LEFT: f64 = 64.0;
    const BOTTOM: f64 = 28.0;
    const TOP: f64 = 12.0;
    let plot_w = W - LEFT - 8.0;
    let plot_h = H - BOTTOM - TOP;
    let bucket_ms = bucket_ms.max(1);
    let first = from_ms.saturating_sub(from_ms.rem_euclid(bucket_ms));
    let buckets = (to_ms.saturating_sub(first) / bucket_ms)
        .saturating_add(1)
        .clamp(1, MAX_BUCKETS) as f64;
    // Bars outside the window (there are none from the API) are not drawn.
    let values: Vec<(UnixMillis, f64)> = values
        .iter()
        .copied()
        .filter(|(t, v)| *t >= first && *t <= to_ms && v.is_finite())
        .collect();
    let max = nice_ceiling(values.iter().map(|(_, v)| *v).fold(0.0, f64::max));
    let x =
        |t: UnixMillis| LEFT + t.saturating_sub(first) as f64 / bucket_ms as f64 / buckets * plot_w;
    let y = |v: f64| TOP + plot_h - v / max * plot_h;
    let bar_w = (plot_w / buckets - 1.0).max(1.0);
    let label = |t: UnixMillis| {
        let text = time(t);
        let part = if bucket_ms >= 86_400_000 {
            0..10
        } else {
            5..16
        };
        text.get(part).unwrap_or(&text).to_owned()
    };
    html! {
        figure.chart {
            figcaption { (title) " (" (unit) " per " (if bucket_ms >= 86_400_000 { "day" } else { "hour" }) ")" }
            svg xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (W) " " (H) } role="img" aria-label={ (title) " in " (unit) } {
                @for tick in [0.0, 0.5, 1.0] {
                    line.grid x1=(LEFT) x2=(W - 8.0) y1=(y(tick * max)) y2=(y(tick * max)) {}
                    text.axis x=(LEFT - 6.0) y=(y(tick * max) + 4.0) text-anchor="end" { (number(tick * max)) }
                }
                text.axis x="12" y=(TOP + plot_h / 2.0) text-anchor="middle" transform={ "rotate(-90 12 " (TOP + plot_h / 2.0) ")" } { (unit) }
                @for (t, v) in &values {
                    rect.bar x=(x(*t)) y=(y(*v)) width=(bar_w) height=((TOP + plot_h - y(*v)).max(0.0)) {
                        title { (label(*t)) ": " (number(*v)) " " (unit) }
                    }
                }
                line.axis-line x1=(LEFT) x2=(W - 8.0) y1=(TOP + plot_h) y2=(TOP + plot_h) {}
                @for (t, anchor) in [(first, "start"), (to_ms, "end")] {
                    text.axis x=(if anchor == "start" { LEFT } else { W - 8.0 }) y=(H - 8.0) text-anchor=(anchor) { (label(t)) }
                }
            }
        }
    }
}

async fn usage(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Page {
    let filled = Filled::of(query.as_deref());
    let axum::Json(view) =
        billing::usage(State(ctl), caller, RawQuery(Some(filled.query()))).await?;
    let get = |k: &str| filled.get(k);
    let bucket_ms: i64 = if view.granularity == "day" {
        86_400_000
    } else {
        3_600_000
    };
    if view.to_ms.saturating_sub(view.from_ms) / bucket_ms > MAX_BUCKETS {
        return Err(super::PageError::bad_request(format!(
            "the window holds more than {MAX_BUCKETS} buckets of a {}: choose a shorter one, or by day",
            view.granularity
        )));
    }
    // One chart per subject and meter, the busiest (most records) first.
    let mut series: BTreeMap<(String, String), (i64, Vec<&UsageRow>)> = BTreeMap::new();
    for row in &view.rows {
        let entry = series
            .entry((row.subject.clone(), row.meter.clone()))
            .or_default();
        entry.0 += row.records;
        entry.1.push(row);
    }
    let mut series: Vec<_> = series.into_iter().collect();
    series.sort_by_key(|(key, (records, _))| (std::cmp::Reverse(*records), key.clone()));
    let shown = series.len().min(MAX_CHARTS);
    Ok(page(
        "Usage",
        &signed,
        html! {
            h1 { "Usage" }
            form.filters method="get" action="/console/usage" {
                label for="instance" { "Instance" } input #instance name="instance" value=(get("instance"));
                label for="agent" { "Host" } input #agent name="agent" value=(get("agent")) placeholder="agent id";
                label for="meter" { "Meter" } input #meter name="meter" value=(get("meter")) placeholder="cpu_ns";
                label for="granularity" { "By" }
                select #granularity name="granularity" {
                    option value="hour" selected[view.granularity == "hour"] { "hour" }
                    option value="day" selected[view.granularity == "day"] { "day" }
                }
                button type="submit" { "Show" }
            }
            p.hint { (time(view.from_ms)) " to " (time(view.to_ms)) "; a record counts in the bucket its period ends in." }
            @if series.is_empty() { p.empty { "No usage recorded in this window." } }
            @for ((subject, meter), (_, rows)) in series.iter().take(shown) {
                @let (scale, unit) = unit_of(meter);
                @let values: Vec<(UnixMillis, f64)> = rows.iter().map(|r| {
                    let v = if r.kind == "counter" { r.total } else { r.mean };
                    (r.bucket_start_ms, v.unwrap_or(0) as f64 / scale)
                }).collect();
                (bar_chart(&format!("{subject} · {meter}"), unit, &values, view.from_ms, view.to_ms, bucket_ms))
            }
            @if series.len() > shown { p.hint { (series.len() - shown) " more series; narrow the filter to see them." } }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_label_their_axes_and_units() {
        let hour = 3_600_000;
        let svg = bar_chart(
            "i-1 · cpu_ns",
            "CPU-seconds",
            &[(0, 30.0), (hour, 45.0)],
            0,
            2 * hour,
            hour,
        )
        .into_string();
        assert!(svg.contains("<svg"), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 2, "one bar per bucket");
        // The axis goes to a round number above the highest bar, labelled with units.
        assert!(svg.contains(">50<") && svg.contains(">25<"), "{svg}");
        assert!(svg.contains("CPU-seconds per hour"), "{svg}");
        assert!(
            svg.contains("01-01 00:00") && svg.contains("01-01 02:00"),
            "{svg}"
        );
        // Extreme windows draw nothing wrong and do not overflow.
        let svg = bar_chart("x", "u", &[(0, 1.0)], i64::MIN, i64::MAX, hour).into_string();
        assert!(svg.contains("<svg"), "{svg}");
        // Hostile subjects stay text.
        let svg = bar_chart("<script>", "x", &[], 0, hour, hour).into_string();
        assert!(!svg.contains("<script>"), "{svg}");
    }

    #[test]
    fn scales_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(45.0), 50.0);
        assert_eq!(nice_ceiling(101.0), 200.0);
        assert_eq!(nice_ceiling(0.03), 0.05);
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(0.005), "0.005");
        assert_eq!(number(12.25), "12.2");
        assert_eq!(unit_of("cpu_ns"), (1e9, "CPU-seconds"));
        assert_eq!(unit_of("net_rx_bytes").1, "MiB");
        assert_eq!(unit_of("state_ms.running").1, "seconds");
    }
}
