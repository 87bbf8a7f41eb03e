//! Per-token metrics in Prometheus text format: written atomically as a node_exporter
//! textfile-collector file and/or served on a loopback `/metrics`, with a `/healthz` that
//! fails when a token needs login or its published access token is near expiry.

use chrono::Utc;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

type Getter = fn(&TokenMetrics) -> Option<f64>;

/// One token's figures.
#[derive(Debug, Clone, Default)]
pub struct TokenMetrics {
    pub generation: u64,
    /// Unix seconds.
    pub access_expires: Option<i64>,
    pub refresh_expires: Option<i64>,
    pub last_success: Option<i64>,
    pub attempts: u64,
    pub failures: BTreeMap<String, u64>,
    pub retries: u64,
    pub relogins: u64,
    /// Logins sent: each may have started a session.
    pub logins: u64,
    /// Unix seconds: the session budget is spent and logins wait until then.
    pub logins_held_until: Option<i64>,
    pub needs_login: bool,
    /// The last death of the token's task (with the count of restarts): kept here, where it
    /// outlives the task, and copied into each new task's status.
    pub task: Option<Box<crate::store::TaskFailure>>,
    /// Time left below which `/healthz` calls the token near expiry.
    pub near_expiry: Duration,
}

impl TokenMetrics {
    /// The token's health as `tokend status` names it, from what the daemon itself holds
    /// (`status::running_health`): the daemon's own view, no file read.
    pub fn health(&self, now: chrono::DateTime<Utc>) -> &'static str {
        let token = match self.access_expires {
            None => "no_state",
            Some(e) if e <= now.timestamp() => "expired",
            Some(_) => "ok",
        };
        let held = self.logins_held_until.is_some_and(|t| t > now.timestamp());
        crate::status::running_health(token, self.needs_login, self.task.as_deref(), held, now)
    }
}

/// One token's proxy figures: counted on every request, so atomics, not the metrics lock.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// Responses by status class: 1xx..5xx at 1..=5; index 0 counts any other code.
    pub responses: [AtomicU64; 6],
    /// Requests that waited for a refresh to finish, and their total wait.
    pub held: AtomicU64,
    pub held_micros: AtomicU64,
    /// Requests sent again after a 401 on a replaced token.
    pub replays: AtomicU64,
    /// Refreshes asked for by a 401 on the current token.
    pub forced_refreshes: AtomicU64,
}

impl ProxyCounters {
    pub fn count_status(&self, status: u16) {
        let class = usize::from(status / 100);
        let i = if (1..=5).contains(&class) { class } else { 0 };
        self.responses[i].fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, token: &str, out: &mut String) {
        for (i, n) in self.responses.iter().enumerate() {
            let class = if i == 0 { "other".to_string() } else { format!("{i}xx") };
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "tokend_proxy_requests_total{{token=\"{token}\",class=\"{class}\"}} {n}"
            );
        }
    }
}

/// A panic in one token's task while it held the lock (the supervisor restarts that task) must
/// not panic every other token's task and the exporters after it: the figures are plain
/// counters, still good after a poisoning.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// All tokens' figures; refreshers update, the exporters read.
#[derive(Debug, Default)]
pub struct Metrics {
    tokens: Mutex<BTreeMap<String, TokenMetrics>>,
    /// Tokens with a proxy.
    proxies: Mutex<BTreeMap<String, Arc<ProxyCounters>>>,
    /// Wakes the textfile writer.
    pub changed: Notify,
}

impl Metrics {
    /// A token's entry is made once: its name is copied only then, not for each update (a
    /// login or refresh makes five or six, under the lock every token's task takes).
    pub fn update(&self, token: &str, f: impl FnOnce(&mut TokenMetrics)) {
        let mut tokens = lock(&self.tokens);
        match tokens.get_mut(token) {
            Some(m) => f(m),
            None => f(tokens.entry(token.to_string()).or_default()),
        }
        drop(tokens);
        self.changed.notify_one();
    }

    /// Reads every token's figures under one lock.
    pub fn read<R>(&self, f: impl FnOnce(&BTreeMap<String, TokenMetrics>) -> R) -> R {
        f(&lock(&self.tokens))
    }

    /// The proxy counters of `token`, created on first use.
    pub fn proxy(&self, token: &str) -> Arc<ProxyCounters> {
        lock(&self.proxies).entry(token.to_string()).or_default().clone()
    }

    pub fn remove(&self, token: &str) {
        lock(&self.proxies).remove(token);
        lock(&self.tokens).remove(token);
        self.changed.notify_one();
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let tokens = lock(&self.tokens).clone();
        let mut out = String::new();
        let gauges: [(&str, &str, &str, Getter); 11] = [
            (
                "tokend_access_token_expiry_timestamp_seconds",
                "gauge",
                "When the published access token expires.",
                |m| m.access_expires.map(|v| v as f64),
            ),
            (
                "tokend_refresh_token_expiry_timestamp_seconds",
                "gauge",
                "When the refresh token expires.",
                |m| m.refresh_expires.map(|v| v as f64),
            ),
            (
                "tokend_generation",
                "gauge",
                "Generation of the published token; grows by one per new token.",
                |m| Some(m.generation as f64),
            ),
            (
                "tokend_last_refresh_success_timestamp_seconds",
                "gauge",
                "When the last refresh or login succeeded.",
                |m| m.last_success.map(|v| v as f64),
            ),
            (
                "tokend_needs_login",
                "gauge",
                "1 when the token needs a new login that tokend cannot do on its own.",
                |m| Some(f64::from(u8::from(m.needs_login))),
            ),
            ("tokend_refresh_attempts_total", "counter", "Requests to the token endpoint.", |m| {
                Some(m.attempts as f64)
            }),
            ("tokend_refresh_retries_total", "counter", "Retries after transient errors.", |m| {
                Some(m.retries as f64)
            }),
            (
                "tokend_relogins_total",
                "counter",
                "New sessions started after a dead refresh chain.",
                |m| Some(m.relogins as f64),
            ),
            (
                "tokend_logins_total",
                "counter",
                "Logins sent (the configured grant, not the refresh token); a jwt or password login starts a session.",
                |m| Some(m.logins as f64),
            ),
            (
                "tokend_logins_held_until_timestamp_seconds",
                "gauge",
                "While the session budget is spent: when the next login may go out.",
                |m| m.logins_held_until.map(|v| v as f64),
            ),
            (
                "tokend_task_restarts_total",
                "counter",
                "Times the token's task died (a panic or an unexpected end) and was restarted.",
                |m| Some(m.task.as_ref().map_or(0.0, |t| t.restarts as f64)),
            ),
        ];
        for (name, kind, help, get) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (token, m) in &tokens {
                if let Some(v) = get(m) {
                    let _ = writeln!(out, "{name}{{token=\"{token}\"}} {v}");
                }
            }
        }
        let name = "tokend_refresh_failures_total";
        let _ = writeln!(
            out,
            "# HELP {name} Failed token requests by error code.\n# TYPE {name} counter"
        );
        for (token, m) in &tokens {
            for (code, n) in &m.failures {
                let _ = writeln!(
                    out,
                    "{name}{{token=\"{token}\",code=\"{}\"}} {n}",
                    code.replace(['"', '\\', '\n'], "_")
                );
            }
        }
        self.render_proxies(&mut out);
        out
    }

    fn render_proxies(&self, out: &mut String) {
        type Get = fn(&ProxyCounters) -> f64;
        let proxies = lock(&self.proxies).clone();
        if proxies.is_empty() {
            return;
        }
        let name = "tokend_proxy_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Proxied requests by response status class.\n# TYPE {name} counter"
        );
        for (token, c) in &proxies {
            c.render(token, out);
        }
        let families: [(&str, &str, Get); 4] = [
            (
                "tokend_proxy_held_requests_total",
                "Proxied requests held while the token was refreshed.",
                |c| c.held.load(Ordering::Relaxed) as f64,
            ),
            ("tokend_proxy_held_seconds_total", "Total time proxied requests were held.", |c| {
                c.held_micros.load(Ordering::Relaxed) as f64 / 1e6
            }),
            (
                "tokend_proxy_replays_total",
                "Proxied requests replayed after a 401 on a replaced token.",
                |c| c.replays.load(Ordering::Relaxed) as f64,
            ),
            (
                "tokend_proxy_forced_refreshes_total",
                "Refreshes asked for by a 401 on the current token.",
                |c| c.forced_refreshes.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (token, c) in &proxies {
                let _ = writeln!(out, "{name}{{token=\"{token}\"}} {}", get(c));
            }
        }
    }

    /// Reasons the service is unhealthy; empty when healthy.
    pub fn problems(&self) -> Vec<String> {
        let now = Utc::now().timestamp();
        let tokens = lock(&self.tokens);
        let mut out = Vec::new();
        for (name, m) in tokens.iter() {
            if m.needs_login {
                out.push(format!("{name}: needs login"));
            }
            if let Some(t) = m.task.as_ref().filter(|t| t.restart_at > Utc::now()) {
                out.push(format!("{name}: its task died ({}); restarting", t.reason));
            }
            match m.access_expires {
                None => out.push(format!("{name}: no token published")),
                Some(e) if e - now < m.near_expiry.as_secs() as i64 => {
                    out.push(format!("{name}: access token expires in {}s", e - now));
                }
                Some(_) => {}
            }
        }
        out
    }
}

/// Rewrites the textfile whenever a figure changes (at most every 100 ms), until dropped.
pub async fn write_textfile(metrics: std::sync::Arc<Metrics>, path: std::path::PathBuf) {
    loop {
        let text = metrics.render();
        if let Err(e) = crate::store::write_atomic(&path, text.as_bytes(), 0o644) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write metrics file");
        }
        metrics.changed.notified().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(metrics: std::sync::Arc<Metrics>, listener: tokio::net::TcpListener) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let router =
        axum::Router::new()
            .route(
                "/metrics",
                get(move || async move {
                    ([("content-type", "text/plain; version=0.0.4")], m1.render())
                }),
            )
            .route(
                "/healthz",
                get(move || async move {
                    let problems = metrics.problems();
                    if problems.is_empty() {
                        (StatusCode::OK, "ok\n".to_string())
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
                    }
                }),
            );
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_an_update_does_not_poison_the_others() {
        let m = Metrics::default();
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            m.update("a", |_| panic!("a token's task dies holding the lock"));
        }));
        assert!(died.is_err());
        m.update("b", |t| t.attempts += 1);
        assert!(m.render().contains("tokend_refresh_attempts_total{token=\"b\"} 1"));
    }
}
