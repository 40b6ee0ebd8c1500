//! A real headless Chromium for UI tests, driven over WebDriver
//! (fantoccini → Debian's chromedriver → Debian's chromium). For a mesh
//! both run inside a test node's network namespace, so that the browser
//! reaches the node's server as an operator on that network would, and the
//! test reaches chromedriver through a [`Relay`] from host loopback into
//! the namespace; for servers on loopback they run beside the test.
//!
//! chromedriver runs in a process group of its own: dropping the
//! [`Browser`] kills the group (chromedriver and every Chromium process)
//! and removes the throwaway profile, also when the test fails.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::netns::Netns;
use crate::relay::Relay;

/// chromedriver's port inside the namespace (the namespace is the test's).
const DRIVER_PORT: u16 = 9515;

/// Flags for Chromium on a machine without a network beyond the test's
/// (no background fetches, no sandbox as root, no GPU).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
];

pub struct Browser {
    pub client: fantoccini::Client,
    driver: Child,
    _relay: Option<Relay>,
    _profile: tempfile::TempDir,
}

/// Whether Debian's chromium and chromedriver are installed
/// (`cargo xtask setup` installs them).
pub fn installed() -> anyhow::Result<()> {
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        if !Path::new(bin).exists() {
            bail!("{bin} is missing: run `cargo xtask setup` (packages chromium, chromium-driver)");
        }
    }
    Ok(())
}

impl Browser {
    /// Starts chromedriver in `netns` (this process's namespace if None; its
    /// log at `log`) and opens a session: a new Chromium with an empty
    /// profile that accepts the test CA's certificates.
    pub async fn start(netns: Option<&Netns>, log: &Path) -> anyhow::Result<Browser> {
        installed()?;
        let profile = tempfile::Builder::new()
            .prefix("weft-chromium-")
            .tempdir()?;
        let log_file = std::fs::File::create(log)?;
        let port = match netns {
            Some(_) => DRIVER_PORT,
            None => crate::servers::free_port(),
        };
        let mut cmd = Command::new("/usr/bin/chromedriver");
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0);
        let _ns = netns
            .map(|ns| crate::mesh::in_netns(&mut cmd, ns))
            .transpose()?;
        let driver = cmd.spawn().context("starting chromedriver")?;
        let relay = netns
            .map(|ns| Relay::start_into(ns, ([127, 0, 0, 1], port).into()))
            .transpose()?;
        let mut browser_args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        browser_args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": browser_args },
        });
        let Value::Object(caps) = caps else {
            unreachable!("an object")
        };
        let url = match &relay {
            Some(relay) => format!("http://{}", relay.addr()),
            None => format!("http://127.0.0.1:{port}"),
        };
        // chromedriver takes a moment to listen; a session, a few more.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut builder = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        );
        builder.capabilities(caps);
        let mut browser = Browser {
            client: loop {
                match builder.connect(&url).await {
                    Ok(client) => break client,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("chromedriver not ready: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => bail!(
                        "no WebDriver session within 30 s: {e}\nchromedriver log:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    ),
                }
            },
            driver,
            _relay: relay,
            _profile: profile,
        };
        if let Ok(Some(status)) = browser.driver.try_wait() {
            bail!("chromedriver exited: {status}");
        }
        Ok(browser)
    }

    /// Opens `url`, once more (up to three times in all) when Chromium
    /// shows its `ERR_NETWORK_CHANGED` page instead: it cuts a navigation
    /// off so when its network service believes the interfaces changed
    /// under it. `web_ui` got that page twice, right after a full suite on
    /// a busy machine, with nothing in weft touching the namespace's
    /// interfaces; what Chromium saw change was not found. Any other error
    /// page is the page the test gets.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        const NETWORK_CHANGED: &str = "ERR_NETWORK_CHANGED";
        for attempt in 1..=3 {
            let cut_off = match self.client.goto(url).await {
                Ok(()) => {
                    let text = self
                        .eval(
                            "return document.body ? document.body.innerText : '';",
                            vec![],
                        )
                        .await?;
                    text.as_str().is_some_and(|t| t.contains(NETWORK_CHANGED))
                }
                Err(e) if e.to_string().contains(NETWORK_CHANGED) => true,
                Err(e) => return Err(e.into()),
            };
            if !cut_off {
                return Ok(());
            }
            eprintln!("browser: {url}: {NETWORK_CHANGED} (attempt {attempt} of 3)");
        }
        bail!("{url}: Chromium said {NETWORK_CHANGED} three times")
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn eval(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        Ok(self.client.execute(script, args).await?)
    }

    /// Polls `script` every 100 ms until it returns something other than
    /// null or false, for at most `limit`; returns that value.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        script: &str,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + limit;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            match self.eval(script, vec![]).await {
                Ok(v) if !v.is_null() && v != Value::Bool(false) => return Ok(v),
                Ok(v) => last = v,
                Err(e) => last = Value::String(format!("{e:#}")),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{what}: not within {limit:?} (last: {last})")
    }

    /// Logs in to the UI's login form (showing) with `token`, and waits for
    /// the page to name it.
    pub async fn log_in(&self, token: &str) -> anyhow::Result<()> {
        let input = (self.client.wait())
            .at_most(Duration::from_secs(20))
            .for_element(fantoccini::Locator::Css("#login-token"))
            .await?;
        input.clear().await?;
        input.send_keys(token).await?;
        (self
            .client
            .find(fantoccini::Locator::Css("#login-submit"))
            .await?)
            .click()
            .await?;
        self.wait_for(
            Duration::from_secs(10),
            "logged in",
            "const w = document.querySelector('#whoami'); return w && w.textContent.trim() ? w.textContent : null;",
        )
        .await?;
        Ok(())
    }

    /// Saves a screenshot of the window as `target/ui-screenshots/<name>.png`
    /// and returns the path.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }

    /// Ends the session (Chromium exits); the drop then stops chromedriver.
    pub async fn close(self) -> anyhow::Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium it started.
        let pgid = self.driver.id() as libc::pid_t;
        // SAFETY: signalling a process group this struct created.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}
