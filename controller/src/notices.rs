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

/// How long the name lookup of a webhook's host may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The most notices one account's webhook is sent in a pass (in order, stopping at
/// the first that fails), and the most accounts called at once: an account whose
/// receiver never answers costs one call's timeout per pass, beside the others.
const PER_RECIPIENT: u32 = 10;
const CONCURRENT_RECIPIENTS: usize = 16;

/// Delivers the outbox to webhooks.
#[derive(Debug, Clone)]
pub struct Notifier {
    app: Arc<App>,
    http: reqwest::Client,
}

impl Notifier {
    pub(crate) fn new(app: Arc<App>) -> Self {
        let mut http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy from the environment would connect on the controller's behalf
            // to whatever the name resolves to there.
            .no_proxy();
        if !app.config.webhook_allow_private {
            http = http.dns_resolver(Arc::new(PublicOnly));
        }
        let http = http.build().expect("an HTTP client with default TLS");
        Self { app, http }
    }

    /// Delivers what is due every second until `cancel`: webhooks and agents in
    /// loops of their own, so that slow receivers do not hold up agents' notices.
    pub async fn drive(self, cancel: CancellationToken) {
        tokio::join!(
            self.every_second(&cancel, "webhook", Self::deliver_webhooks),
            self.every_second(&cancel, "agent notice", Self::deliver_to_agents),
        );
    }

    async fn every_second<'a, F, Fut>(&'a self, cancel: &CancellationToken, what: &str, pass: F)
    where
        F: Fn(&'a Self) -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>> + 'a,
    {
        loop {
            if let Err(e) = pass(self).await {
                tracing::error!(error = %e, "{what} delivery pass failed");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One pass of both kinds of delivery.
    pub async fn deliver_due(&self) -> Result<(), StoreError> {
        self.deliver_webhooks().await?;
        self.deliver_to_agents().await
    }

    /// One pass over webhooks: for each account with notices due (up to
    /// [`PER_RECIPIENT`] of them), its notices in order, stopping at the first that
    /// fails; up to [`CONCURRENT_RECIPIENTS`] accounts at a time.
    pub async fn deliver_webhooks(&self) -> Result<(), StoreError> {
        let now = self.app.clock.now_ms();
        let due = self
            .app
            .store
            .deliverable(now, MAX_ATTEMPTS, PER_RECIPIENT, 500)
            .await?;
        let mut by_recipient: std::collections::BTreeMap<String, Vec<Delivery>> =
            Default::default();
        for d in due {
            by_recipient
                .entry(d.notice.notice.recipient.clone())
                .or_default()
                .push(d);
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_RECIPIENTS));
        let mut calls = tokio::task::JoinSet::new();
        for (_, deliveries) in by_recipient {
            let (me, slots) = (self.clone(), slots.clone());
            calls.spawn(async move {
                let _slot = slots.acquire_owned().await;
                for d in &deliveries {
                    if !me.attempt(d).await? {
                        break;
                    }
                }
                Ok::<_, StoreError>(())
            });
        }
        while let Some(done) = calls.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "webhook attempt not recorded"),
                Err(e) => tracing::error!(error = %e, "webhook delivery task failed"),
            }
        }
        Ok(())
    }

    /// One pass over the notices for agents: each to its agent if it is connected
    /// (one that is not gets its notices when it is back).
    pub async fn deliver_to_agents(&self) -> Result<(), StoreError> {
        let now = self.app.clock.now_ms();
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

    /// One attempt to deliver `d` to its webhook; whether it was delivered.
    async fn attempt(&self, d: &Delivery) -> Result<bool, StoreError> {
        let n = &d.notice;
        let body = serde_json::json!({
            "key": n.notice.key,
            "recipient": n.notice.recipient,
            "kind": n.notice.kind,
            "body": n.notice.body,
            "created_at_ms": n.created_at_ms,
        });
        // The URL was checked when it was set; checked again in case the rules
        // changed. A name is checked as it resolves for the call itself (`PublicOnly`).
        if let Err(why) = check_url(&d.url, self.app.config.webhook_allow_private) {
            self.record(n, Err(why)).await?;
            return Ok(false);
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
            Err(e) => Err(match refusal(&e) {
                Some(why) => why,
                None if e.is_timeout() => "no answer within 10 s".to_owned(),
                None if e.is_connect() => "connection refused or unreachable".to_owned(),
                None => e.to_string(),
            }),
        };
        let delivered = outcome.is_ok();
        self.record(n, outcome).await?;
        Ok(delivered)
    }
}

/// Why [`PublicOnly`] refused a webhook's host, as the account sees it (the addresses
/// are in the controller's log only: a webhook is no way to map internal names).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// The refusal of [`PublicOnly`] behind a failed call, if that is why it failed.
fn refusal(e: &reqwest::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Some(r.0.clone());
        }
        source = s.source();
    }
    None
}

/// Resolves webhook hosts for the calls themselves and refuses a name with any
/// address that is not public, so the check and the connection use one lookup: a
/// name that answers with a public address when checked and a private one when
/// called (DNS rebinding) never reaches the private one.
#[derive(Debug)]
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = match tokio::time::timeout(
                LOOKUP_TIMEOUT,
                tokio::net::lookup_host((host.as_str(), 0)),
            )
            .await
            {
                Err(_) => return Err(Refused(format!("{host} did not resolve within 5 s")).into()),
                Ok(Err(e)) => return Err(Refused(format!("{host} does not resolve: {e}")).into()),
                Ok(Ok(addrs)) => addrs.collect(),
            };
            if let Some(private) = addrs.iter().find(|a| !public(a.ip())) {
                tracing::warn!(%host, address = %private.ip(), "webhook refused: its host resolves to a non-public address");
                return Err(Refused(format!(
                    "refused: {host} resolves to an address that is not public"
                ))
                .into());
            }
            if addrs.is_empty() {
                return Err(Refused(format!("{host} resolves to no address")).into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
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
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b & 0xfe) == 18)
                || (a == 192 && b == 0 && v4.octets()[2] == 0))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return public(IpAddr::V4(v4));
            }
            // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) carry an IPv4
            // address in the low 32 bits, 6to4 (2002:aabb:ccdd::) in bits 16 to 48:
            // each is as public as the address it carries.
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return public(embedded(s[6], s[7]));
            }
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return public(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return public(embedded(s[1], s[2]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0)
        }
    }
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
            ("IPv4-compatible private", "http://[::10.0.0.1]/", false),
            ("NAT64 of loopback", "http://[64:ff9b::7f00:1]/", false),
            ("6to4 of a private address", "http://[2002:a00:1::]/", false),
            (
                "6to4 of a public address",
                "http://[2002:c633:6307::]/",
                true,
            ),
            ("IPv6 site-local", "http://[fec0::1]/", false),
            ("IPv6 public", "http://[2001:4860:4860::8888]/", true),
            ("benchmarking", "http://198.18.0.1/", false),
            ("reserved", "http://240.0.0.1/", false),
            ("IETF protocol assignments", "http://192.0.0.8/", false),
        ] {
            assert_eq!(check_url(url, false).is_ok(), ok, "{rule}: {url}");
        }
        assert!(
            check_url("http://127.0.0.1:5432/", true).is_ok(),
            "allowed by the operator"
        );
    }

    /// The lookup the calls use refuses a name with a non-public address (the name
    /// rule of `check_url` aside: `localhost` stands here for any name that resolves
    /// to the controller's own network).
    #[tokio::test]
    async fn the_calls_lookup_refuses_names_of_private_addresses() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let refused = match PublicOnly.resolve(name).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            refused,
            "refused: localhost resolves to an address that is not public"
        );
        // And a call through a client that resolves with it fails with that reason.
        let client = reqwest::Client::builder()
            .dns_resolver(std::sync::Arc::new(PublicOnly))
            .no_proxy()
            .build()
            .unwrap();
        let e = client.get("http://localhost:9/").send().await.unwrap_err();
        assert_eq!(refusal(&e).as_deref(), Some(refused.as_str()), "{e:?}");
    }
}
