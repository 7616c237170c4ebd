//! The HTTP client every command module uses, and the printing both forms share.

use anyhow::{Context, bail};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde::Serialize;
use serde::de::DeserializeOwned;
use surplus_api::ErrorBody;

/// The controller's API, with the caller's token.
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Client {
    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::GET, path, None::<&()>).await
    }

    /// `POST path` without a body.
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::POST, path, None::<&()>).await
    }

    /// `POST path` with `body`.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// `PUT path` with `body`.
    pub async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::DELETE, path, None::<&()>).await
    }

    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{}", self.base.trim_end_matches('/'), path);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            request = request.json(b);
        }
        let response = request.send().await.map_err(|e| {
            // reqwest's own message hides the cause (refused, TLS, DNS): show the chain.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(&format!(": {s}"));
                source = s.source();
            }
            anyhow::anyhow!("cannot reach the controller at {}: {why}", self.base)
        })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .context("reading the controller's answer")?;
        if status.is_success() {
            // An empty answer (204) reads as JSON null.
            let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(body)
                .with_context(|| format!("unexpected answer from {url}"));
        }
        let detail = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| format!("{} ({})", e.message, e.error))
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!("the controller refused the API token: {detail}");
        }
        bail!("{status}: {detail}");
    }
}

/// Prints `value` as JSON with `--json`, else as `human` prints it.
pub fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce()) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("API values serialize")
        );
    } else {
        human();
    }
}

/// A table with the CLI's look.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(header);
    t
}

/// The time now, ms since the epoch.
pub fn now_ms() -> i64 {
    surplus_protocol::clock::Clock::now_ms(&surplus_protocol::clock::SystemClock)
}

/// `ms` relative to `now`: `3m ago`, `in 2h`, `never`.
pub fn when(ms: Option<i64>, now: i64) -> String {
    let span =
        |d: i64| humantime::format_duration(std::time::Duration::from_secs((d / 1000) as u64));
    match ms {
        None => "never".into(),
        Some(t) if now >= t => format!("{} ago", span(now - t)),
        Some(t) => format!("in {}", span(t - now)),
    }
}

/// The API's base URL: `host:port` alone means plain HTTP, as the API listens on
/// loopback without TLS by default.
pub fn base_url(text: &str) -> String {
    let text = text.trim();
    if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_address_is_plain_http() {
        assert_eq!(base_url("127.0.0.1:7080"), "http://127.0.0.1:7080");
        assert_eq!(
            base_url("ctl.example.com:7080/"),
            "http://ctl.example.com:7080/"
        );
        assert_eq!(
            base_url("https://ctl.example.com"),
            "https://ctl.example.com"
        );
        assert_eq!(base_url("http://[::1]:7080"), "http://[::1]:7080");
    }
}
