//! `tokend check`'s resolved plan: what the daemon would do, with no secret in it.

use super::{Config, ConfigSecret, Grant, TokenConfig};
use crate::text::{escape_controls, path};
use chrono::Utc;
use std::fmt::Write;

impl Config {
    /// A human-readable plan of every token.
    pub fn plan(&self) -> String {
        let mut out =
            format!("config {}: OK, {} token(s)\n", self.path.display(), self.tokens.len());
        if let Some(c) = &self.cluster {
            let _ = writeln!(
                out,
                "\ncluster (etcd): node {:?}, endpoints {}, prefix {}, lease TTL {} s",
                if c.node.is_empty() { "(this host's name)" } else { c.node.as_str() },
                c.endpoints.join(", "),
                c.prefix,
                c.lease_ttl.as_secs()
            );
            let _ = writeln!(
                out,
                "  etcd auth {}, TLS {}, stored values {}",
                c.user.as_ref().map_or("none", |_| "user and password"),
                if c.endpoints[0].starts_with("https:") { "on" } else { "off" },
                if c.encryption_key.is_some() { "sealed (AES-256-GCM)" } else { "not encrypted" }
            );
        }
        for t in &self.tokens {
            token_plan(&mut out, t);
        }
        out
    }
}

/// The provider's rules that this token follows.
fn provider_plan(out: &mut String, t: &TokenConfig) {
    let p = t.provider;
    let replay = match p.replay {
        crate::provider::Replay::Always => "always safe".into(),
        crate::provider::Replay::Within(w) => {
            format!("within {}", humantime::format_duration(w))
        }
        crate::provider::Replay::Never => "never (log in again instead)".into(),
    };
    // The refresh deadline keeps the refresh token used inside it (`policy::idle_deadline`).
    let idle = p.idle_expiry.map_or_else(String::new, |i| {
        // In days, as providers state them (humantime says "5months 27days 19h 12m").
        format!(", refresh token idle expiry {} days", i.as_secs() / 86_400)
    });
    let _ = writeln!(
        out,
        "  provider        {} (client auth {}, rotation {}, replay of a lost refresh {replay}{idle})",
        p.name,
        t.client_auth.name(),
        if p.rotates { "on" } else { "off" },
    );
}

fn token_plan(out: &mut String, t: &TokenConfig) {
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(out, "\ntoken \"{}\"", t.name);
    provider_plan(out, t);
    let _ = writeln!(out, "  token endpoint  {}", redact_url(&t.token_url));
    let _ = writeln!(out, "  client_id       {}", escape_controls(&t.client_id));
    let secret =
        t.client_secret.as_ref().map_or_else(|| "none (public app)".into(), ConfigSecret::describe);
    let _ = writeln!(out, "  client_secret   {secret}");
    let grant = match &t.grant {
        Grant::Password { username, password, .. } => {
            let user = escape_controls(username);
            format!("password (legacy) as {user}, password {}", password.describe())
        }
        Grant::AuthorizationCode { .. } => {
            "authorization_code (first state from `tokend login`)".into()
        }
        Grant::ClientCredentials => {
            "client_credentials (no refresh token: a new token each time)".into()
        }
        Grant::Jwt { assertion: s } | Grant::RefreshToken { refresh_token: s } => {
            format!("{} (secret {})", t.grant.name(), s.describe())
        }
    };
    let _ = writeln!(out, "  grant           {grant}");
    let _ = writeln!(out, "  state_file      {}", path(&t.state_file));
    let next = t
        .schedule
        .next_after(Utc::now())
        .map(|n| n.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let often = if t.schedule.fires_again() {
        format!("every {} at least", d(t.schedule.min_interval()))
    } else {
        "then never again".into()
    };
    let _ = writeln!(
        out,
        "  schedule        {} (next {}, {often})",
        t.schedule.expr,
        next.unwrap_or_default(),
    );
    let _ = writeln!(out, "  jitter          up to {}", d(t.jitter));
    let _ = writeln!(out, "  safety margin   {} before access token expiry", d(t.safety_margin));
    let ttl = |v: Option<u64>| v.map_or_else(|| "server default".into(), |s| format!("{s} s"));
    let _ = writeln!(
        out,
        "  ttls            access {}, refresh {}",
        ttl(t.access_token_ttl),
        ttl(t.refresh_token_ttl)
    );
    let _ = writeln!(
        out,
        "  retries         backoff {} to {}, at most {} token requests per {}",
        d(t.retry.initial),
        d(t.retry.max),
        t.rate.requests,
        d(t.rate.window)
    );
    if t.grant.starts_sessions() {
        let _ = writeln!(
            out,
            "  logins          at most {} an hour, each a new session (session_budget)",
            t.rate.sessions
        );
    }
    for s in &t.sinks {
        let rt = if s.include_refresh_token { ", with refresh token" } else { "" };
        let _ = writeln!(
            out,
            "  sink            {} ({}, mode {:04o}{rt})",
            path(&s.path),
            format!("{:?}", s.format).to_lowercase(),
            s.mode
        );
    }
    if t.sinks.is_empty() {
        let _ = writeln!(out, "  sink            none (state file only)");
    }
    for p in &t.proxies {
        let _ = writeln!(
            out,
            "  proxy           {} -> {} (drain {}, replays bodies up to {} bytes{}{})",
            p.listen,
            p.upstream,
            d(p.drain_timeout),
            p.replay_body_limit,
            upstream_cap(p),
            if p.access_log { ", access log" } else { "" }
        );
    }
    if let Some(h) = &t.on_refresh {
        let _ = writeln!(out, "  on_refresh      {:?} (timeout {})", h.argv, d(h.timeout));
    }
}

/// The connection cap, which applies to plain-HTTP upstreams (HTTPS goes through the
/// daemon's shared client, HTTP/2 where the upstream offers it).
fn upstream_cap(p: &crate::config::ProxyConfig) -> String {
    if p.upstream.scheme() == "http" {
        format!(", at most {} upstream connections", p.max_upstream_connections)
    } else {
        String::new()
    }
}

/// A URL for people: a password in it and every query value replaced, so that `check`
/// never prints a credential someone put in `server` or `token_url`.
pub(super) fn redact_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("REDACTED"));
    }
    if u.query().is_some() {
        let keys: Vec<String> = u.query_pairs().map(|(k, _)| k.into_owned()).collect();
        u.query_pairs_mut().clear().extend_pairs(keys.iter().map(|k| (k, "REDACTED")));
    }
    escape_controls(u.as_str()).into_owned()
}
