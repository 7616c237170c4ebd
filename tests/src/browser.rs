//! A real headless Chromium for console tests, driven over WebDriver: Debian's
//! `chromium` and `chromium-driver`, one driver process per test binary.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

/// A running `chromedriver` and one browser session over it.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: tokio::process::Child,
    shots: PathBuf,
    seen: usize,
    test: String,
}

/// Where the browser binaries are; a clear failure naming the packages when not.
fn binaries() -> (PathBuf, PathBuf) {
    let find = |names: &[&str]| {
        names
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| {
                names.iter().find_map(|n| {
                    std::env::split_paths(&std::env::var_os("PATH")?)
                        .map(|d| d.join(n))
                        .find(|p| p.exists())
                })
            })
    };
    let chromium = find(&["/usr/bin/chromium", "chromium", "chromium-browser"]);
    let driver = find(&["/usr/bin/chromedriver", "chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => (c, d),
        _ => panic!(
            "the console tests need a headless Chromium and its WebDriver: \
             apt-get install chromium chromium-driver (.ci/run installs them)"
        ),
    }
}

impl Browser {
    /// Starts `chromedriver` on a free port and opens a headless Chromium session;
    /// screenshots of `test` go under `target/console-screenshots/`.
    pub async fn start(test: &str) -> Self {
        let (chromium, chromedriver) = binaries();
        // The WebDriver client's TLS stack (unused on loopback) needs a provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let port = crate::free_tcp_port();
        let driver = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            }),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::rustls()
                .expect("rustls connector")
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("chromedriver not ready: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no browser session from chromedriver at {url}: {e}"),
            }
        };
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/console-screenshots")
            .join(test);
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).expect("screenshot directory");
        Self {
            client,
            driver,
            shots,
            seen: 0,
            test: test.to_owned(),
        }
    }

    /// Saves a screenshot of the page shown now, named after `step`.
    pub async fn shot(&mut self, step: &str) {
        self.seen += 1;
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.shots.join(format!("{:02}-{step}.png", self.seen));
        std::fs::write(&path, png).expect("screenshot written");
    }

    /// Opens `url` and saves a screenshot named `step`.
    pub async fn visit(&mut self, url: &str, step: &str) {
        self.client.goto(url).await.expect("page opens");
        self.shot(step).await;
    }

    /// How many elements `css` finds on the page.
    pub async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .expect("finding elements")
            .len()
    }

    /// The text of the element `css` (panics, naming the page, when it is missing).
    pub async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.expect("element text"),
            Err(e) => panic!(
                "{}: no {css:?} on {}: {e}\n{}",
                self.test,
                self.url().await,
                self.client.source().await.unwrap_or_default()
            ),
        }
    }

    /// Types `value` into the field `css`.
    pub async fn fill(&self, css: &str, value: &str) {
        let field = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no field {css:?}: {e}"));
        field.clear().await.expect("field clears");
        field.send_keys(value).await.expect("typing");
    }

    /// Clicks the element `css`, a link or a form's button, and waits for the page it
    /// leads to (the old page's document goes stale once the new one replaced it).
    pub async fn click(&self, css: &str) {
        let old = self
            .client
            .find(Locator::Css("html"))
            .await
            .expect("a page is shown");
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("nothing to click at {css:?}: {e}"))
            .click()
            .await
            .expect("click");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while old.tag_name().await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: clicking {css:?} led to no new page",
                self.test
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The path of the page shown now.
    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.path().to_owned())
            .unwrap_or_default()
    }

    /// The page's title.
    pub async fn title(&self) -> String {
        self.client.title().await.expect("title")
    }

    /// Waits up to `within` for `css`'s text to satisfy `want`, reloading the page as a
    /// person would (a refreshing page reloads itself; this also covers one that does
    /// not).
    pub async fn until_text(
        &mut self,
        css: &str,
        within: Duration,
        want: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if let Ok(t) = e.text().await {
                    if want(&t) {
                        return t;
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{}: {css:?} did not reach what was wanted within {within:?}",
                    self.test
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = self.client.refresh().await;
        }
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }
}
