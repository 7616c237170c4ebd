//! The console's layout and the small formatting helpers its pages share. Everything
//! is written through maud, which escapes every value it is given: a label, a name
//! or a command is text on the page whatever it contains.

use maud::{DOCTYPE, Markup, html};
use surplus_market::records::Role;
use surplus_protocol::clock::UnixMillis;

use super::Signed;

/// A page of a signed-in user: the navigation of their role, then `body`.
pub fn page(title: &str, signed: &Signed, body: Markup) -> Markup {
    let p = &signed.principal;
    let nav: &[(&str, &str)] = match p.role {
        Role::Admin => &[
            ("/console/fleet", "Fleet"),
            ("/console/instances", "Instances"),
            ("/console/volumes", "Volumes"),
            ("/console/usage", "Usage"),
            ("/console/invoices", "Invoices"),
            ("/console/statements", "Statements"),
            ("/console/balances", "Balances"),
            ("/console/providers", "Providers"),
            ("/console/resell", "Resell"),
            ("/console/listings", "Listings"),
            ("/console/auctions", "Auctions"),
            ("/console/pricing", "Prices"),
            ("/console/brokerage", "Brokerage"),
            ("/console/notifications", "Notices"),
            ("/console/api", "API"),
        ],
        Role::Client => &[
            ("/console/instances", "Instances"),
            ("/console/volumes", "Volumes"),
            ("/console/usage", "Usage"),
            ("/console/invoices", "Invoices"),
            ("/console/balances", "Balances"),
            ("/console/offers", "Offers"),
            ("/console/reservations", "Reservations"),
            ("/console/auctions", "Auctions"),
            ("/console/pools", "Pools"),
            ("/console/pricing", "Prices"),
            ("/console/listings", "Listings"),
            ("/console/notifications", "Notices"),
            ("/console/api", "API"),
        ],
        Role::Provider => &[
            ("/console/fleet", "Hosts"),
            ("/console/statements", "Statement"),
            ("/console/balances", "Balance"),
            ("/console/providers", "Agreements"),
            ("/console/resell", "Resell center"),
            ("/console/listings", "Listings"),
            ("/console/auctions", "Auctions"),
            ("/console/notifications", "Notices"),
            ("/console/api", "API"),
        ],
        Role::PoolOwner => &[
            ("/console/pools", "Pools"),
            ("/console/balances", "Balances"),
            ("/console/listings", "Listings"),
            ("/console/notifications", "Notices"),
            ("/console/api", "API"),
        ],
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    a.brand href="/console/" { "Surplus" }
                    nav { @for (href, name) in nav { a href=(href) { (name) } } }
                    span.who { (p.account) " · " (p.role.as_str()) }
                    form.inline method="post" action="/console/sign-out" {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        button type="submit" { "Sign out" }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Surplus" }
            link rel="stylesheet" href="/console/console.css";
        }
    }
}

/// A page without a signed-in user (sign-in, errors).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body { main.narrow { (body) } }
        }
    }
}

/// A POST button with the session's CSRF token; `confirm` adds a class for a
/// destructive action.
pub fn action(signed: &Signed, to: &str, label: &str, danger: bool) -> Markup {
    html! {
        form.inline method="post" action=(to) {
            input type="hidden" name="csrf" value=(signed.csrf);
            button.danger[danger] type="submit" { (label) }
        }
    }
}

/// `2026-12-03 13:04:05 UTC`.
pub fn time(ms: UnixMillis) -> String {
    // RFC 3339 ends at the year 9999.
    const LAST_MS: u64 = 253_402_300_799_999;
    let Some(ms) = u64::try_from(ms).ok().filter(|ms| *ms <= LAST_MS) else {
        return "-".into();
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// An optional time, `-` when absent.
pub fn time_or_dash(ms: Option<UnixMillis>) -> String {
    ms.map_or_else(|| "-".into(), time)
}

/// How long ago `ms` was, at `now_ms`: `3 s ago`, `2 min ago`, `5 h ago`, `4 d ago`.
pub fn ago(ms: UnixMillis, now_ms: UnixMillis) -> String {
    let s = (now_ms - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// Bytes in binary units: `512 MiB`, `15.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 || value.fract() < 0.05 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Thousandths of a CPU as CPUs: `0.5`, `2`.
pub fn cpus(millicpus: u32) -> String {
    let c = f64::from(millicpus) / 1000.0;
    format!("{c}")
}

/// Labels as `k=v` chips.
pub fn labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> Markup {
    html! { @for (k, v) in labels { span.chip { (k) "=" (v) } " " } }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Principal;

    fn signed() -> Signed {
        Signed {
            principal: Principal {
                account: "<b>mallory</b>".into(),
                role: Role::Client,
            },
            csrf: "\"><script>alert(1)</script>".into(),
        }
    }

    /// Whatever a hostile user puts in a name, a label or a command is text on the
    /// page, never markup.
    #[test]
    fn hostile_values_render_as_text() {
        let label_key = "team".to_string();
        let label_value = "<script>alert('x')</script>".to_string();
        let page = page(
            "<title>",
            &signed(),
            html! { p { (labels([(&label_key, &label_value)])) } p { "/bin/sh -c \"<img src=x onerror=alert(1)>\"" } },
        )
        .into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<b>mallory"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert('x')&lt;/script&gt;"),
            "{page}"
        );
        assert!(
            page.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{page}"
        );
        // The CSRF token sits in an attribute: its quote is escaped too.
        assert!(page.contains("value=\"&quot;&gt;&lt;script&gt;"), "{page}");
        assert!(page.contains("&lt;title&gt; · Surplus"), "{page}");
    }

    #[test]
    fn units_read_as_people_write_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 20), "64 MiB");
        assert_eq!(bytes((15 << 30) + (512 << 20)), "15.5 GiB");
        assert_eq!(cpus(500), "0.5");
        assert_eq!(cpus(2000), "2");
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!((time(-1), time(i64::MAX)), ("-".into(), "-".into()));
        assert_eq!(ago(0, 59_999), "59 s ago");
        assert_eq!(ago(0, 7_200_000), "2 h ago");
    }
}
