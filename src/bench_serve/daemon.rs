//! A daemon: `canvas serve` as a child process, stopped on drop.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use super::{TOKEN, WRITE_KEY};

/// How to start a daemon, kept so a killed one can be started again the same way.
#[derive(Debug, Clone)]
pub(super) struct Launch {
    pub(super) exe: PathBuf,
    pub(super) flows: PathBuf,
    pub(super) config: PathBuf,
    pub(super) database: String,
    /// Extra environment, e.g. a channel's signing secret.
    pub(super) env: Vec<(String, String)>,
}

pub(super) struct Daemon {
    pub(super) child: Option<Child>,
    pub(super) pid: u32,
    pub(super) base: String,
    pub(super) log: Arc<Mutex<VecDeque<String>>>,
}

impl Daemon {
    pub(super) async fn start(launch: &Launch) -> anyhow::Result<Daemon> {
        let mut child = Command::new(&launch.exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
            .arg(&launch.flows)
            .arg("--config")
            .arg(&launch.config)
            .arg("--database")
            .arg(&launch.database)
            .env("CANVAS_API_TOKEN", TOKEN)
            .env("CANVAS_WRITE_KEY", WRITE_KEY)
            .env_remove("CANVAS_API_READ_TOKEN")
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} serve", launch.exe.display()))?;
        let pid = child.id();
        let log: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("canvas serve: listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_owned());
                }
                if let Ok(mut l) = sink.lock() {
                    if l.len() == 40 {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            pid,
            base: String::new(),
            log,
        };
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(base)) => daemon.base = base,
            Ok(Err(_)) => bail!("the daemon exited before listening{}", daemon.log_tail()),
            Err(_) => bail!("the daemon did not listen within 60 s{}", daemon.log_tail()),
        }
        Ok(daemon)
    }

    pub(super) fn log_tail(&self) -> String {
        let lines = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        if lines.is_empty() {
            return String::new();
        }
        let mut text = format!("; daemon {} said:", self.pid);
        for l in lines.iter().rev().take(10).rev() {
            text.push_str("\n    ");
            text.push_str(l);
        }
        text
    }

    pub(super) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!("daemon {} exited ({status}){}", self.pid, self.log_tail());
        }
        Ok(())
    }

    /// SIGKILL, as a crash would: no shutdown, claims and leases left as they were.
    pub(super) fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("daemon {} is not running", self.pid);
        };
        child
            .kill()
            .with_context(|| format!("killing daemon {}", self.pid))?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM, then wait for it to finish what is in flight (30 s at most, then SIGKILL).
    /// True when it exited with status 0.
    pub(super) async fn stop(&mut self) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        sigterm(self.pid);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        sigterm(self.pid);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

pub(super) fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
