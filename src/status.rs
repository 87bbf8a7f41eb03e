//! `tokend status`: each token's state as the files on disk tell it, for the operator's first
//! command when paged. Reads the state and status files; works while the daemon runs.

use crate::config::{Config, Grant, TokenConfig};
use crate::store::{State, StateLock, Status};
use crate::time::left;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt::Write;

/// How long a task's death keeps its token unhealthy in `tokend status`.
const TASK_FAILURE_SHOWN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// One token's report (the `--json` shape).
#[derive(Debug, Serialize)]
pub struct TokenReport {
    pub name: String,
    /// ok | not_running | needs_login | logins_held | task_failed | expired | no_state |
    /// unreadable
    pub health: &'static str,
    pub daemon_pid: Option<u32>,
    pub generation: Option<u64>,
    pub access_expires_at: Option<String>,
    pub access_expires_in_secs: Option<i64>,
    pub refresh_expires_at: Option<String>,
    pub refresh_expires_in_secs: Option<i64>,
    pub last_refresh_at: Option<String>,
    pub session_started_at: Option<String>,
    pub next_refresh_at: Option<String>,
    pub needs_login: bool,
    /// Logins (new sessions) in the last hour, and the token's `session_budget`.
    pub logins_last_hour: usize,
    pub session_budget: usize,
    /// The session budget is spent: no login before this (while the daemon runs).
    pub logins_held_until: Option<String>,
    pub last_error: Option<crate::store::ErrorRecord>,
    /// The token's task died while this daemon ran (and was restarted, or will be).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<crate::store::TaskFailure>,
    pub problem: Option<String>,
    /// Multi-host mode: this node's role and whether etcd answers (while the daemon runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::store::ClusterStatus>,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Who holds which `flock`, from `/proc/locks`, read once for all tokens (a read per token
/// made a summary of many tokens quadratic: the table has a line per lock held).
pub struct LockHolders(Option<HashSet<(u32, u64)>>);

impl LockHolders {
    pub fn read() -> Self {
        Self(std::fs::read_to_string("/proc/locks").ok().map(|t| flocks(&t)))
    }

    /// Whether `pid` holds a `flock` on inode `inode`. Without `/proc/locks` (unusual),
    /// whether the process is alive is the best left.
    fn holds(&self, pid: u32, inode: u64) -> bool {
        match &self.0 {
            Some(held) => held.contains(&(pid, inode)),
            None => std::path::Path::new(&format!("/proc/{pid}")).exists(),
        }
    }
}

/// The (pid, inode) of each `flock` held in a `/proc/locks` text (lines like
/// `1: FLOCK  ADVISORY  WRITE 1234 fe:00:5933071 0 EOF`; a waiter's line has `->` after the
/// number). The device is left out: overlay file systems report another device to `stat`
/// than to the lock table.
fn flocks(table: &str) -> HashSet<(u32, u64)> {
    table
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace().skip(1);
            if f.next()? != "FLOCK" {
                return None;
            }
            let mut f = f.skip(2);
            let pid = f.next()?.parse().ok()?;
            let inode = f.next()?.rsplit(':').next()?.parse().ok()?;
            Some((pid, inode))
        })
        .collect()
}

/// The pid in the token's lock file, if that process holds the lock. A process that merely
/// has that pid (the daemon died and the number was reused) does not count.
fn daemon_pid(cfg: &TokenConfig, holders: &LockHolders) -> Option<u32> {
    let path = StateLock::path_for(&cfg.state_file);
    // A regular file only: a FIFO in its place must not block the daemon's status summary.
    let bytes = crate::store::read_regular(&path, 64).ok()?;
    let pid: u32 = std::str::from_utf8(&bytes).ok()?.trim().parse().ok()?;
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).ok()?);
    holders.holds(pid, inode).then_some(pid)
}

/// Builds the report of one token.
pub fn report(cfg: &TokenConfig, now: DateTime<Utc>, holders: &LockHolders) -> TokenReport {
    let status = Status::load(&cfg.state_file).unwrap_or_default();
    let state = State::load_for(&cfg.state_file, &cfg.name);
    let pid = daemon_pid(cfg, holders);
    let mut r = TokenReport {
        name: cfg.name.clone(),
        health: "ok",
        daemon_pid: pid,
        generation: None,
        access_expires_at: None,
        access_expires_in_secs: None,
        refresh_expires_at: None,
        refresh_expires_in_secs: None,
        last_refresh_at: None,
        session_started_at: None,
        next_refresh_at: None,
        needs_login: status.needs_login,
        logins_last_hour: status
            .logins
            .iter()
            .filter(|t| now - **t < chrono::Duration::hours(1))
            .count(),
        session_budget: cfg.rate.sessions,
        logins_held_until: None,
        last_error: status.last_error.map(|e| *e),
        task: None,
        problem: None,
        cluster: None,
    };
    match state {
        Ok(Some(s)) => {
            r.generation = Some(s.generation);
            r.access_expires_at = Some(ts(s.access_expires_at));
            r.access_expires_in_secs = Some((s.access_expires_at - now).num_seconds());
            r.refresh_expires_at = s.refresh_expires_at.map(ts);
            r.refresh_expires_in_secs = s.refresh_expires_at.map(|t| (t - now).num_seconds());
            r.last_refresh_at = Some(ts(s.refreshed_at));
            r.session_started_at = Some(ts(s.session_started_at));
            if s.access_expires_at <= now {
                r.health = "expired";
            }
        }
        Ok(None) => {
            r.health = "no_state";
            if matches!(cfg.grant, Grant::AuthorizationCode { .. }) {
                r.needs_login = true;
            }
        }
        Err(e) => {
            r.health = "unreadable";
            r.problem = Some(e.to_string());
        }
    }
    // A plan is only a plan while a daemon is there to carry it out; a good token that
    // nobody refreshes lapses within the hour, so it is not healthy.
    if pid.is_some() {
        r.next_refresh_at = status.next_refresh_at.map(ts);
        r.cluster = status.cluster.map(|c| *c);
        r.task = status.task.map(|t| *t);
        let held = status.logins_held_until.filter(|t| *t > now);
        r.logins_held_until = held.map(ts);
        r.health = running_health(r.health, r.needs_login, r.task.as_ref(), held.is_some(), now);
    } else if r.needs_login {
        r.health = "needs_login";
    } else if r.health == "ok" {
        r.health = "not_running";
        r.problem = Some(format!(
            "no tokend refreshes this token; the access token lapses at {}: start it \
             (systemctl start tokend)",
            r.access_expires_at.as_deref().unwrap_or("?")
        ));
    }
    r
}

/// The health of a token that a daemon refreshes, from its files (`tokend status`) or from
/// the daemon's own memory (`systemctl status`), so that both say the same: `token` is what
/// the published token says (ok, expired, no_state, unreadable).
pub fn running_health(
    token: &'static str,
    needs_login: bool,
    task: Option<&crate::store::TaskFailure>,
    logins_held: bool,
    now: DateTime<Utc>,
) -> &'static str {
    // A task that died is a bug to look at: unhealthy until it restarts and for an hour
    // after, whether or not the restart helped.
    let recent =
        |t: &crate::store::TaskFailure| t.restart_at > now || now - t.at < TASK_FAILURE_SHOWN;
    if needs_login {
        "needs_login"
    } else if token != "ok" {
        token
    } else if task.is_some_and(recent) {
        "task_failed"
    } else if logins_held {
        // Holding back logins means the token cannot get a new one until then: not healthy.
        "logins_held"
    } else {
        "ok"
    }
}

/// All tokens' reports.
pub fn reports(config: &Config) -> Vec<TokenReport> {
    let now = Utc::now();
    let holders = LockHolders::read();
    config.tokens.iter().map(|t| report(t, now, &holders)).collect()
}

/// The human form.
pub fn render(reports: &[TokenReport]) -> String {
    let now = Utc::now();
    let mut out = String::new();
    for r in reports {
        let parse = |s: &Option<String>| {
            s.as_deref()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        let daemon =
            r.daemon_pid.map_or_else(|| "not running".into(), |p| format!("running (pid {p})"));
        let _ = writeln!(
            out,
            "{}: {}  [daemon {daemon}]",
            r.name,
            r.health.replace('_', " ").to_uppercase()
        );
        let show = |label: &str, t: Option<DateTime<Utc>>, out: &mut String| {
            if let Some(t) = t {
                let _ = writeln!(out, "  {label:<16}{} ({})", ts(t), rel(t, now));
            }
        };
        if let Some(g) = r.generation {
            let _ = writeln!(out, "  {:<16}{g}", "generation");
        }
        show("access expires", parse(&r.access_expires_at), &mut out);
        show("refresh expires", parse(&r.refresh_expires_at), &mut out);
        show("last refresh", parse(&r.last_refresh_at), &mut out);
        show("session started", parse(&r.session_started_at), &mut out);
        show("next refresh", parse(&r.next_refresh_at), &mut out);
        if r.needs_login {
            let _ = writeln!(
                out,
                "  {:<16}run `tokend login --token {}` (or check the JWT and SIGHUP)",
                "needs login", r.name
            );
        }
        if let Some(until) = parse(&r.logins_held_until) {
            let _ = writeln!(
                out,
                "  {:<16}holding back new logins until {} ({}): {} logins in the last hour \
                 spent the session budget of {} (session_budget)",
                "logins held",
                ts(until),
                rel(until, now),
                r.logins_last_hour,
                r.session_budget
            );
        }
        if let Some(t) = &r.task {
            let when = if t.restart_at > now { "restarts" } else { "restarted" };
            let _ = writeln!(
                out,
                "  {:<16}{} time(s), last at {} ({}): {}; {when} {}",
                "task died",
                t.restarts,
                ts(t.at),
                rel(t.at, now),
                t.reason,
                rel(t.restart_at, now)
            );
        }
        if let Some(e) = &r.last_error {
            let kind = if e.permanent { "permanent" } else { "transient" };
            let _ = writeln!(
                out,
                "  {:<16}{} at {} ({kind}): {}",
                "last error",
                e.code,
                ts(e.at),
                e.message
            );
        }
        if let Some(c) = &r.cluster {
            let etcd = match c.etcd_unreachable_since {
                _ if c.etcd_reachable => "etcd ok".to_string(),
                Some(t) => format!(
                    "etcd unreachable since {} ({}): nobody refreshes; serving the last token",
                    ts(t),
                    rel(t, now)
                ),
                None => "etcd unreachable: nobody refreshes; serving the last token".into(),
            };
            let _ = writeln!(out, "  {:<16}node {}, {}; {etcd}", "cluster", c.node, c.role);
        }
        if let Some(p) = &r.problem {
            let _ = writeln!(out, "  {:<16}{p}", "problem");
        }
    }
    out
}

fn rel(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    if t >= now { format!("in {}", left(t, now)) } else { format!("{} ago", left(now, t)) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_flock_held_by_that_pid_on_that_inode_counts() {
        let locks = "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5933071 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 99 fe:00:77 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 42 08:01:77 0 EOF\n";
        let holders = super::LockHolders(Some(super::flocks(locks)));
        assert!(holders.holds(1234, 5_933_071));
        assert!(!holders.holds(1235, 5_933_071), "another pid");
        assert!(!holders.holds(1234, 5_933_072), "another file");
        assert!(!holders.holds(99, 77), "waiting for the lock is not holding it");
        assert!(!holders.holds(42, 77), "a POSIX lock is not the daemon's");
    }
}
