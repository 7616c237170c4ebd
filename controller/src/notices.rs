//! Delivery of the outbox to the accounts' webhooks: every notice queued for a
//! recipient that has a webhook is POSTed to it as JSON; each attempt is recorded, and
//! a failed one is tried again with backoff (`surplus_market::outbox::retry_at`) until
//! it is delivered or given up. Delivery is at least once: a receiver recognises a
//! repeat by the notice's key (`X-Surplus-Notice` and the body's `key`).

use std::sync::Arc;
use std::time::Duration;

use surplus_market::outbox::{MAX_ATTEMPTS, retry_at};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use surplus_protocol::messages::{HostNotice, Message};

use crate::store::{Delivery, DeliveryAttempt, StoreError, StoredNotice};

/// How long a notice for an agent that is not connected waits before it is looked at
/// again.
const OFFLINE_AGENT_RECHECK_MS: i64 = 30_000;

/// How long one webhook call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Delivers the outbox to webhooks.
#[derive(Debug, Clone)]
pub struct Notifier {
    app: Arc<App>,
    http: reqwest::Client,
}

impl Notifier {
    pub(crate) fn new(app: Arc<App>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with default TLS");
        Self { app, http }
    }

    /// Delivers what is due every second until `cancel`.
    pub async fn drive(self, cancel: CancellationToken) {
        loop {
            if let Err(e) = self.deliver_due().await {
                tracing::error!(error = %e, "webhook delivery pass failed");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One pass: every notice due now, one attempt each: to webhooks, and to the
    /// agents that are connected (one that is not gets its notices when it is back).
    pub async fn deliver_due(&self) -> Result<(), StoreError> {
        let now = self.app.clock.now_ms();
        // Up to eight webhook calls at a time: one slow receiver does not hold up the
        // others' notices for its whole timeout each.
        let due = self.app.store.deliverable(now, MAX_ATTEMPTS, 100).await?;
        for chunk in due.chunks(8) {
            let mut calls = tokio::task::JoinSet::new();
            for d in chunk {
                let (me, d) = (self.clone(), d.clone());
                calls.spawn(async move { me.attempt(&d).await });
            }
            while let Some(done) = calls.join_next().await {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "webhook attempt not recorded"),
                    Err(e) => tracing::error!(error = %e, "webhook attempt failed"),
                }
            }
        }
        for n in self
            .app
            .store
            .agent_deliverable(now, MAX_ATTEMPTS, 500)
            .await?
        {
            let Some(agent) = n
                .notice
                .recipient
                .strip_prefix("agent:")
                .and_then(|a| a.parse::<uuid::Uuid>().ok())
            else {
                continue;
            };
            if self.app.link.is_connected(agent) {
                self.to_agent(agent, &n).await?;
            } else {
                // Not an attempt: looked at again in a while, so that notices for
                // agents that are away do not crowd out the others.
                self.app
                    .store
                    .postpone_notice(&n.notice.key, now + OFFLINE_AGENT_RECHECK_MS)
                    .await?;
            }
        }
        Ok(())
    }

    /// Sends a notice to an agent over its session.
    async fn to_agent(&self, agent: uuid::Uuid, n: &StoredNotice) -> Result<(), StoreError> {
        let message = Message::HostNotice(HostNotice {
            key: n.notice.key.clone(),
            kind: n.notice.kind.clone(),
            body_json: n.notice.body.to_string(),
            created_at_ms: n.created_at_ms,
        });
        let outcome = match self.app.link.call(agent, &message, CALL_TIMEOUT).await {
            Ok(Message::HostNoticeAck(_)) => Ok(()),
            Ok(Message::Error(e)) => Err(format!("the agent refused it: {}", e.message)),
            Ok(other) => Err(format!("the agent answered {}", other.kind())),
            Err(e) => Err(e.to_string()),
        };
        self.record(n, outcome).await
    }

    /// Records an attempt's outcome, with when to try again after a failure.
    async fn record(
        &self,
        n: &StoredNotice,
        outcome: Result<(), String>,
    ) -> Result<(), StoreError> {
        let at_ms = self.app.clock.now_ms();
        let attempt = DeliveryAttempt {
            attempt: n.attempts + 1,
            at_ms,
            outcome: match &outcome {
                Ok(()) => "delivered".to_owned(),
                Err(e) => e.clone(),
            },
        };
        let next = match outcome {
            Ok(()) => None,
            Err(_) => retry_at(attempt.attempt, at_ms),
        };
        match &attempt.outcome[..] {
            "delivered" => {
                tracing::info!(key = %n.notice.key, recipient = %n.notice.recipient, attempt = attempt.attempt, "notice delivered")
            }
            why => {
                tracing::warn!(key = %n.notice.key, recipient = %n.notice.recipient, attempt = attempt.attempt, %why, retry_at = ?next, "notice not delivered")
            }
        }
        self.app
            .store
            .record_attempt(
                &n.notice.key,
                &attempt,
                attempt.outcome == "delivered",
                next,
            )
            .await
    }

    async fn attempt(&self, d: &Delivery) -> Result<(), StoreError> {
        let n = &d.notice;
        let body = serde_json::json!({
            "key": n.notice.key,
            "recipient": n.notice.recipient,
            "kind": n.notice.kind,
            "body": n.notice.body,
            "created_at_ms": n.created_at_ms,
        });
        let allowed = if self.app.config.webhook_allow_private {
            Ok(())
        } else {
            resolves_public(&d.url).await
        };
        if let Err(why) = allowed {
            return self.record(n, Err(why)).await;
        }
        let outcome = match self
            .http
            .post(&d.url)
            .header("X-Surplus-Notice", &n.notice.key)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Err("no answer within 10 s".to_owned()),
            Err(e) if e.is_connect() => Err("connection refused or unreachable".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        self.record(n, outcome).await
    }
}

/// Why a webhook URL is refused: not an absolute http(s) URL, or (unless
/// `allow_private`) one whose host is a loopback, private, link-local or otherwise
/// non-public address, so that a webhook cannot make the controller call its own
/// network.
pub fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "{url:?} is a {} URL; a webhook is http or https",
            u.scheme()
        ));
    }
    let Some(host) = u.host_str().filter(|h| !h.is_empty()) else {
        return Err(format!("{url:?} names no host"));
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let private = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => !public(ip),
        Err(_) => {
            let name = bare.to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    };
    if private && !allow_private {
        return Err(format!(
            "{url:?} is on a private or local network; webhooks go to public addresses (the controller's webhook_allow_private allows others)"
        ));
    }
    Ok(())
}

/// A public unicast address.
pub fn public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => public(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80)
            }
        },
    }
}

/// Refuses to call a webhook whose host resolves to a non-public address now (the
/// name may have changed since it was set).
async fn resolves_public(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    let host = u
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = u.port_or_known_default().unwrap_or(80);
    let addrs = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("{host} does not resolve: {e}"))?;
    for a in addrs {
        if !public(a.ip()) {
            return Err(format!(
                "refused: {host} resolves to {}, not a public address",
                a.ip()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case: (rule it pins, URL, allowed).
    #[test]
    fn webhooks_go_to_public_http_addresses() {
        for (rule, url, ok) in [
            (
                "https to a public name",
                "https://hooks.example.com/x",
                true,
            ),
            ("http to a public address", "http://198.51.99.7:8080/", true),
            ("not http", "ftp://example.com/", false),
            ("not a URL", "hooks", false),
            ("loopback", "http://127.0.0.1:5432/", false),
            ("loopback, short form", "http://127.1/", false),
            ("localhost by name", "http://localhost/", false),
            ("private", "http://10.1.2.3/", false),
            (
                "link-local (cloud metadata)",
                "http://169.254.169.254/latest",
                false,
            ),
            ("shared address space", "http://100.64.0.1/", false),
            ("IPv6 loopback", "http://[::1]/", false),
            ("IPv6 unique local", "http://[fd00::1]/", false),
            ("IPv4-mapped loopback", "http://[::ffff:127.0.0.1]/", false),
        ] {
            assert_eq!(check_url(url, false).is_ok(), ok, "{rule}: {url}");
        }
        assert!(
            check_url("http://127.0.0.1:5432/", true).is_ok(),
            "allowed by the operator"
        );
    }
}
