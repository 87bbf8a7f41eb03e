//! Table-style tests of the refresh policy with a driven clock.

use super::*;

#[test]
fn a_replaced_budget_counts_the_last_leaders_requests() {
    let now = Instant::now() + Duration::from_secs(100);
    let mut b = RequestBudget::new(2, Duration::from_secs(60));
    b.record(now);
    let ago = |s| now.checked_sub(Duration::from_secs(s)).unwrap();
    b.replace([ago(50), ago(10), ago(5)]);
    assert_eq!(b.sent().collect::<Vec<_>>(), [ago(10), ago(5)], "the newest, up to the limit");
    assert_eq!(b.earliest(now), ago(10) + Duration::from_secs(60));
}

#[test]
fn deadline_keeps_margin_or_half_the_lifetime() {
    let t0 = Utc::now();
    let hour = t0 + chrono::Duration::seconds(3600);
    assert_eq!(
        refresh_deadline(t0, hour, Duration::from_secs(300)),
        hour - chrono::Duration::seconds(300)
    );
    let short = t0 + chrono::Duration::seconds(10);
    assert_eq!(
        refresh_deadline(t0, short, Duration::from_secs(300)),
        t0 + chrono::Duration::seconds(5)
    );
    assert_eq!(refresh_deadline(short, t0, Duration::from_secs(300)), t0, "already expired: now");
}

/// A refresh token the server says dies before the access token (RingCentral's
/// `refresh_token_ttl` below an hour) is refreshed before it does, by the same margin; one
/// whose expiry a refresh does not move on (a session's absolute end) is not chased.
#[test]
fn deadline_keeps_a_sliding_refresh_token_alive_and_leaves_an_absolute_one() {
    let c = Clock::new();
    let mut p = Policy::new(rules(ChainHome::StateFile, G::Jwt));
    let times = |at: u64, rt_ttl: u64| Lifetimes {
        refresh_expires: Some(c.wall(at + rt_ttl * S)),
        ..c.times(at, 3600)
    };
    p.token_changed(times(0, 1200), 0.0);
    assert_eq!(p.deadline(), Some(c.wall(900 * S)), "20 minutes less the 5-minute margin");
    // Refreshed then: the new refresh token lives 20 minutes again (sliding).
    p.on_success(times(900 * S, 1200), 0.0);
    assert_eq!(p.deadline(), Some(c.wall(1800 * S)));
    // Refreshed again, but the refresh token still dies at 2,100 s (an absolute end): the
    // access token's deadline holds, not a refresh at once in a loop.
    p.on_success(
        Lifetimes { refresh_expires: Some(c.wall(2100 * S)), ..c.times(1800 * S, 3600) },
        0.0,
    );
    assert_eq!(p.deadline(), Some(c.wall((1800 + 3300) * S)));
    // The same token seen again (a mirror, a reload) keeps what was learnt.
    p.token_changed(
        Lifetimes { refresh_expires: Some(c.wall(2100 * S)), ..c.times(1800 * S, 3600) },
        0.0,
    );
    assert_eq!(p.deadline(), Some(c.wall((1800 + 3300) * S)));
    // A longer-lived refresh token (7 days) never binds before the access token.
    let mut p = Policy::new(rules(ChainHome::StateFile, G::Jwt));
    p.token_changed(times(0, 604_800), 0.0);
    assert_eq!(p.deadline(), Some(c.wall(3300 * S)));
}

#[test]
fn backoff_grows_caps_and_honours_retry_after() {
    let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
    assert_eq!(backoff(1, i, m, None, 0.999_999), Duration::from_secs(1).mul_f64(0.999_999_5));
    assert_eq!(backoff(1, i, m, None, 0.0), Duration::from_millis(500));
    assert_eq!(backoff(3, i, m, None, 0.0), Duration::from_secs(2));
    assert_eq!(backoff(40, i, m, None, 0.0), Duration::from_secs(30));
    assert!(backoff(40, i, m, None, 1.0) <= m);
    assert_eq!(backoff(1, i, m, Some(Duration::from_secs(90)), 0.5), Duration::from_secs(90));
    // A failed login: 1 to 2 minutes first, never more than 30.
    let (li, lm) = (LOGIN_RETRY_INITIAL, LOGIN_RETRY_MAX);
    assert_eq!(backoff(1, li, lm, None, 0.0), Duration::from_secs(60));
    assert_eq!(backoff(30, li, lm, None, 0.0), Duration::from_secs(900));
    assert_eq!(backoff(30, li, lm, None, 1.0), Duration::from_secs(1800));
}

#[test]
fn budget_spaces_requests() {
    let t0 = Instant::now();
    let mut b = RequestBudget::new(2, Duration::from_secs(60));
    assert_eq!(b.earliest(t0), t0);
    b.record(t0);
    b.record(t0 + Duration::from_secs(10));
    assert_eq!(b.earliest(t0 + Duration::from_secs(20)), t0 + Duration::from_secs(60));
    assert_eq!(b.earliest(t0 + Duration::from_secs(61)), t0 + Duration::from_secs(61));
}

#[test]
fn budget_forgets_what_left_the_window() {
    let t0 = Instant::now();
    let mut b = RequestBudget::new(1000, Duration::from_secs(60));
    for i in 0..100 {
        b.record(t0 + Duration::from_secs(i));
    }
    assert_eq!(b.sent().count(), 60, "only the last 60 s are kept, not up to the limit");
    assert_eq!(b.sent().next(), Some(t0 + Duration::from_secs(40)));
}

// ---- The state machine, driven by a made-up clock, the same table for both modes. ----

const S: u64 = 1000; // milliseconds in a second, for readable times below

/// One step of a scenario: an input at a time (ms since the start), or a check.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// A new token is published, issued at `at` and living `ttl` seconds.
    Token {
        at: u64,
        ttl: u64,
        draw: f64,
    },
    Tick {
        at: u64,
        draw: f64,
    },
    RefreshNow {
        at: u64,
    },
    Bootstrap {
        at: u64,
    },
    Replay {
        at: u64,
    },
    LoggedIn,
    Hold,
    /// A request goes out; checks what it sends (None: nothing).
    Begin {
        at: u64,
        has_rt: bool,
        sends: Option<Request>,
    },
    Fail {
        at: u64,
        failure: Failure,
        draw: f64,
        next: Next,
    },
    Succeed {
        at: u64,
        ttl: u64,
        draw: f64,
    },
    /// Checks whether a request should go out at `at` (`behind`: the state file is behind).
    Attempt {
        at: u64,
        behind: bool,
        single: bool,
        cluster: bool,
    },
    /// Checks the next wake-up, as ms since the start.
    Wake {
        at: u64,
        expect: u64,
    },
    /// Checks the expiry deadline, as ms since the start (None: no deadline).
    Deadline(Option<u64>),
    NeedsLogin(bool),
    /// Checks until when logins are held by the session budget (ms since the start).
    Held(Option<u64>),
    /// Checks the earliest time the rate budget and `Retry-After` let a request go.
    Gate {
        at: u64,
        expect: u64,
    },
}

use Step::{
    Attempt, Begin, Bootstrap, Deadline, Fail, Gate, Held, Hold, LoggedIn, NeedsLogin, RefreshNow,
    Replay, Succeed, Tick, Token, Wake,
};

/// The grants as the policy sees them.
#[derive(Debug, Clone, Copy)]
enum G {
    /// jwt, password: logs in by itself, as often as needed.
    Jwt,
    /// refresh_token: a first token by itself, never a second session.
    Rt,
    /// authorization_code: only `tokend login`.
    Code,
}

fn rules(home: ChainHome, grant: G) -> Rules {
    Rules {
        jitter: Duration::from_secs(120),
        safety_margin: Duration::from_secs(300),
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(60),
        requests: 5,
        window: Duration::from_secs(60),
        sessions: 3,
        logins_start_sessions: !matches!(grant, G::Rt),
        can_relogin: matches!(grant, G::Jwt),
        can_log_in: !matches!(grant, G::Code),
        home,
        replay: crate::provider::Replay::Within(Duration::from_secs(3600)),
        idle_expiry: Some(Duration::from_secs(IDLE)),
    }
}

/// The refresh token's idle expiry in the table: RingCentral's 7 days, in seconds. Only a
/// token living longer than most of it (rows below) meets it; hour-long ones never do.
const IDLE: u64 = 7 * 86_400;
/// A tenth early: 6.3 days after the last refresh.
const IDLE_DEADLINE: u64 = IDLE * 9 / 10 * S;

/// client_credentials gets every token by a "login" that starts no session: the session
/// budget and the login backoff in minutes do not apply to it.
#[test]
fn client_credentials_requests_are_not_sessions() {
    let c = Clock::new();
    let cc =
        Rules { logins_start_sessions: false, sessions: 1, ..rules(ChainHome::StateFile, G::Jwt) };
    let mut p = Policy::new(cc);
    for i in 0..5 {
        p.refresh_now(c.now(i * 1000));
        assert_eq!(p.begin(c.now(i * 1000), false), Some(Request::Login), "request {i}");
    }
    let next = p.on_failure(c.now(5000), Failure::Transient { retry_after: None }, 1.0);
    assert_eq!(next, Next::Retry(Duration::from_secs(1)), "the ordinary backoff");
    let mut p = Policy::new(Rules { sessions: 1, ..rules(ChainHome::StateFile, G::Jwt) });
    assert_eq!(p.begin(c.now(0), false), Some(Request::Login));
    p.refresh_now(c.now(1000));
    assert_eq!(p.begin(c.now(1000), false), None, "a session login is budgeted");
}

#[test]
fn a_request_that_did_not_go_out_spends_no_session() {
    let c = Clock::new();
    let mut p = Policy::new(Rules { sessions: 1, ..rules(ChainHome::Etcd, G::Jwt) });
    assert_eq!(p.begin(c.now(0), false), Some(Request::Login));
    p.not_sent();
    assert_eq!(p.recent_logins(c.now(0)).count(), 0);
    assert!(matches!(p.on_failure(c.now(0), Failure::Store, 0.0), Next::Retry(_)));
    p.refresh_now(c.now(1000));
    assert_eq!(p.begin(c.now(1000), false), Some(Request::Login), "the session is still there");
    p.refresh_now(c.now(2000));
    assert_eq!(p.begin(c.now(2000), false), None, "and now it is spent");
}

/// Issue 14: a refresh whose reply was lost is replayed only inside the provider's window
/// (RingCentral's grace, Okta's leeway, always where the old token keeps working); past it,
/// or where a replay revokes the family, a new login if the grant can, else needs login.
#[test]
fn a_lost_reply_is_replayed_only_where_the_provider_allows() {
    use crate::provider::Replay as R;
    let c = Clock::new();
    let s = Duration::from_secs;
    let cases = [
        // (replay rule, grant, second loss at s, next after first loss, next after second)
        (R::Always, G::Code, 86_400, Next::Retry(s(1)), Next::Retry(s(2))),
        (R::Within(s(30)), G::Code, 10, Next::Retry(s(1)), Next::Retry(s(2))),
        (R::Within(s(30)), G::Code, 31, Next::Retry(s(1)), Next::NeedsLogin),
        (R::Within(s(30)), G::Jwt, 31, Next::Retry(s(1)), Next::Relogin),
        (R::Never, G::Jwt, 0, Next::Relogin, Next::Relogin),
        (R::Never, G::Rt, 0, Next::NeedsLogin, Next::NeedsLogin),
    ];
    for (replay, grant, second, first_next, second_next) in cases {
        let mut p = Policy::new(Rules { replay, ..rules(ChainHome::StateFile, grant) });
        let why = format!("{replay:?} {grant:?}");
        assert_eq!(p.on_failure(c.now(0), Failure::LostReply, 1.0), first_next, "{why}");
        let next = p.on_failure(c.now(second * 1000), Failure::LostReply, 1.0);
        assert_eq!(next, second_next, "{why}");
        if next == Next::Relogin {
            assert_eq!(p.begin(c.now(second * 1000), true), Some(Request::Login), "{why}");
        }
    }
    // The spent refresh token is never sent again: not on a tick, not on SIGUSR1, and not
    // as a configured bootstrap token (same family); a person's login clears it.
    let mut p = Policy::new(Rules { replay: R::Never, ..rules(ChainHome::StateFile, G::Rt) });
    assert_eq!(p.on_failure(c.now(0), Failure::LostReply, 1.0), Next::NeedsLogin);
    p.on_tick(c.now(1000), 0.0);
    p.refresh_now(c.now(2000));
    assert_eq!(p.begin(c.now(2000), true), None);
    p.logged_in();
    p.refresh_now(c.now(3000));
    assert_eq!(p.begin(c.now(3000), true), Some(Request::Refresh));
    // After a restart with a refresh in flight: the same rule, by the intent's age.
    let mut p = Policy::new(Rules { replay: R::Never, ..rules(ChainHome::StateFile, G::Code) });
    assert_eq!(p.lost_on_restart(c.now(0), s(1)), Next::NeedsLogin);
    p.refresh_now(c.now(0));
    assert_eq!(p.begin(c.now(0), true), None);
    let mut p = Policy::new(rules(ChainHome::StateFile, G::Code));
    assert_eq!(p.lost_on_restart(c.now(0), s(5)), Next::Retry(Duration::ZERO));
    assert!(p.wanted(c.now(0)));
}

/// The idle expiry comes from the provider's profile; a client_credentials token holds no
/// refresh token, so it has none.
#[test]
fn the_rules_take_the_providers_idle_expiry() {
    let token = |provider: &str, grant: &str| {
        let text = format!(
            "[[token]]\nname = \"t\"\nprovider = \"{provider}\"\ntoken_url = \"https://idp.example/token\"\n\
             client_id = \"id\"\nclient_secret = \"s\"\n{grant}\nstate_file = \"/var/lib/tokend/t.json\"\n"
        );
        let path = std::path::Path::new("/etc/tokend/c.toml");
        let mut config = crate::config::Config::parse(path, &text).expect("valid");
        Rules::new(&config.tokens.remove(0), ChainHome::StateFile).idle_expiry
    };
    let days = |n: u64| Some(Duration::from_secs(n * 86_400));
    let rt = "grant = \"refresh_token\"\nrefresh_token = \"r\"";
    assert_eq!(token("google", rt), days(180));
    assert_eq!(token("xero", rt), days(60));
    assert_eq!(token("auth0", rt), None, "not documented");
    assert_eq!(token("xero", "grant = \"client_credentials\""), None);
}

#[test]
fn only_a_refresh_whose_reply_may_be_lost_is_a_lost_reply() {
    let t = |connect| OAuthError::Transport { message: String::new(), timeout: false, connect };
    assert_eq!(Failure::of(&t(false), true), Failure::LostReply);
    assert!(matches!(Failure::of(&t(true), true), Failure::Transient { .. }), "never sent");
    assert!(matches!(Failure::of(&t(false), false), Failure::Transient { .. }), "a login");
    let body = OAuthError::Body { status: 200, len: 3, reason: String::new() };
    assert_eq!(Failure::of(&body, true), Failure::LostReply);
    let server = crate::oauth::parse_reply(503, b"", None).unwrap_err();
    assert!(matches!(Failure::of(&server, true), Failure::Transient { .. }), "it answered");
}

/// A driven clock: monotonic and wall time advance together from a fixed start.
struct Clock {
    t0: Instant,
    wall0: DateTime<Utc>,
}

impl Clock {
    fn new() -> Self {
        let wall0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().to_utc();
        Self { t0: Instant::now(), wall0 }
    }
    fn now(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }
    fn wall(&self, ms: u64) -> DateTime<Utc> {
        self.wall0 + chrono::Duration::milliseconds(i64::try_from(ms).unwrap())
    }
    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.duration_since(self.t0).as_millis()).unwrap()
    }
    /// A token issued at `at` ms whose access token lives `ttl` s (no refresh expiry said).
    fn times(&self, at: u64, ttl: u64) -> Lifetimes {
        Lifetimes {
            issued: self.wall(at),
            access_expires: self.wall(at + ttl * S),
            refresh_expires: None,
        }
    }
    fn wall_ms(&self, t: DateTime<Utc>) -> u64 {
        u64::try_from((t - self.wall0).num_milliseconds()).unwrap()
    }
}

fn run(name: &str, home: ChainHome, grant: G, steps: &[Step]) {
    let c = Clock::new();
    let mut p = Policy::new(rules(home, grant));
    for (i, step) in steps.iter().enumerate() {
        let at = format!("{name} ({home:?}), step {i}: {step:?}");
        match *step {
            Token { at, ttl, draw } => p.token_changed(c.times(at, ttl), draw),
            Tick { at, draw } => p.on_tick(c.now(at), draw),
            RefreshNow { at } => p.refresh_now(c.now(at)),
            Bootstrap { at: t } => {
                assert_eq!(p.bootstrap(c.now(t)), !matches!(grant, G::Code), "{at}");
            }
            Replay { at } => p.replay(c.now(at)),
            LoggedIn => p.logged_in(),
            Hold => p.hold(),
            Begin { at: t, has_rt, sends } => assert_eq!(p.begin(c.now(t), has_rt), sends, "{at}"),
            Fail { at: t, failure, draw, next } => {
                assert_eq!(p.on_failure(c.now(t), failure, draw), next, "{at}");
            }
            Succeed { at, ttl, draw } => p.on_success(c.times(at, ttl), draw),
            Attempt { at: t, behind, single, cluster } => {
                let want = if home == ChainHome::StateFile { single } else { cluster };
                assert_eq!(p.should_attempt(c.now(t), c.wall(t), behind), want, "{at}");
            }
            Wake { at: t, expect } => {
                assert_eq!(c.ms(p.next_wake(c.now(t), c.wall(t), false)), expect, "{at}");
            }
            Deadline(expect) => assert_eq!(p.deadline().map(|d| c.wall_ms(d)), expect, "{at}"),
            NeedsLogin(expect) => assert_eq!(p.needs_login(), expect, "{at}"),
            Held(expect) => assert_eq!(p.logins_held_until().map(|t| c.ms(t)), expect, "{at}"),
            Gate { at: t, expect } => assert_eq!(c.ms(p.gate(c.now(t))), expect, "{at}"),
        }
    }
}

/// Same decision in both modes.
const fn attempt(at: u64, yes: bool) -> Step {
    Attempt { at, behind: false, single: yes, cluster: yes }
}

const fn transient(retry_after: Option<u64>) -> Failure {
    Failure::Transient {
        retry_after: match retry_after {
            Some(s) => Some(Duration::from_secs(s)),
            None => None,
        },
    }
}

const fn retry(ms: u64) -> Next {
    Next::Retry(Duration::from_millis(ms))
}

/// (name, grant, steps)
const TABLE: &[(&str, G, &[Step])] = &[
    (
        "a tick refreshes after its share of the jitter",
        G::Jwt,
        &[
            Token { at: 0, ttl: 3600, draw: 0.0 },
            Tick { at: 100 * S, draw: 0.5 },
            Wake { at: 100 * S, expect: 160 * S },
            attempt(160 * S - 1, false),
            attempt(160 * S, true),
            Begin { at: 160 * S, has_rt: true, sends: Some(Request::Refresh) },
            // The request consumed the tick: nothing more until the deadline.
            attempt(161 * S, false),
        ],
    ),
    (
        "an earlier tick wins over a later pending one",
        G::Jwt,
        &[Tick { at: 0, draw: 0.9 }, Tick { at: 10 * S, draw: 0.0 }, attempt(10 * S, true)],
    ),
    (
        "the deadline keeps the margin, less up to a tenth of it (at most 30 s) of jitter",
        G::Jwt,
        &[
            Token { at: 0, ttl: 3600, draw: 0.5 },
            Deadline(Some(3285 * S)),
            Wake { at: 3000 * S, expect: 3285 * S },
            attempt(3285 * S, true),
        ],
    ),
    (
        "a short-lived token is refreshed at half its life",
        G::Jwt,
        &[Token { at: 0, ttl: 10, draw: 0.0 }, Deadline(Some(5 * S)), attempt(5 * S, true)],
    ),
    (
        "the longest sleep is the same backstop in both modes",
        G::Jwt,
        &[
            Wake { at: 0, expect: 900 * S },
            Token { at: 0, ttl: 7200, draw: 0.0 },
            Wake { at: 0, expect: 900 * S },
        ],
    ),
    (
        "transient failures back off exponentially with jitter, capped",
        G::Jwt,
        &[
            Fail { at: 0, failure: transient(None), draw: 0.0, next: retry(500) },
            attempt(499, false),
            attempt(500, true),
            Begin { at: 500, has_rt: true, sends: Some(Request::Refresh) },
            Fail { at: 500, failure: transient(None), draw: 0.999, next: retry(1999) },
            Begin { at: 2499, has_rt: true, sends: Some(Request::Refresh) },
            Fail { at: 2499, failure: transient(None), draw: 0.0, next: retry(2000) },
            // A tick does not shorten a retry's wait.
            Tick { at: 3000, draw: 0.0 },
            Wake { at: 3000, expect: 4499 },
        ],
    ),
    (
        "Retry-After is a floor for the retry and a gate for every request",
        G::Jwt,
        &[
            Fail { at: 0, failure: transient(Some(8)), draw: 0.0, next: retry(8000) },
            RefreshNow { at: 1000 },
            Gate { at: 1000, expect: 8000 },
            attempt(7999, false),
            attempt(8000, true),
        ],
    ),
    (
        "the rate budget: a sixth request in a minute waits for the first to leave the window",
        G::Jwt,
        &[
            Begin { at: 0, has_rt: true, sends: Some(Request::Refresh) },
            Begin { at: S, has_rt: true, sends: Some(Request::Refresh) },
            Begin { at: 2 * S, has_rt: true, sends: Some(Request::Refresh) },
            Begin { at: 3 * S, has_rt: true, sends: Some(Request::Refresh) },
            Begin { at: 4 * S, has_rt: true, sends: Some(Request::Refresh) },
            RefreshNow { at: 5 * S },
            Gate { at: 5 * S, expect: 60 * S },
            attempt(59 * S, false),
            attempt(60 * S, true),
        ],
    ),
    (
        "a dead chain with a grant that can log in: log in at once, then refresh again",
        G::Jwt,
        &[
            Token { at: 0, ttl: 3600, draw: 0.0 },
            Fail { at: 0, failure: Failure::DeadChain, draw: 0.0, next: Next::Relogin },
            NeedsLogin(false),
            attempt(0, true),
            Begin { at: 0, has_rt: true, sends: Some(Request::Login) },
            Succeed { at: 0, ttl: 3600, draw: 0.0 },
            RefreshNow { at: S },
            Begin { at: S, has_rt: true, sends: Some(Request::Refresh) },
        ],
    ),
    (
        "a dead chain without a login grant: needs login, no deadline, retried on a tick, cleared on success",
        G::Rt,
        &[
            Token { at: 0, ttl: 3600, draw: 0.0 },
            Fail { at: 0, failure: Failure::DeadChain, draw: 0.0, next: Next::NeedsLogin },
            NeedsLogin(true),
            Deadline(None),
            Wake { at: 0, expect: 900 * S },
            Tick { at: 10 * S, draw: 0.0 },
            attempt(10 * S, true),
            Begin { at: 10 * S, has_rt: true, sends: Some(Request::Refresh) },
            Succeed { at: 10 * S, ttl: 3600, draw: 0.0 },
            NeedsLogin(false),
            Deadline(Some(3310 * S)),
        ],
    ),
    (
        "a permanent failure with a login grant: needs login; the next attempt logs in",
        G::Jwt,
        &[
            Fail { at: 0, failure: Failure::Permanent, draw: 0.0, next: Next::NeedsLogin },
            NeedsLogin(true),
            Tick { at: 0, draw: 0.0 },
            Begin { at: 0, has_rt: true, sends: Some(Request::Login) },
            Fail { at: 0, failure: Failure::Permanent, draw: 0.0, next: Next::NeedsLogin },
            Succeed { at: S, ttl: 3600, draw: 0.0 },
            NeedsLogin(false),
        ],
    ),
    (
        "a login by a person clears needs-login and any retry",
        G::Rt,
        &[
            Fail { at: 0, failure: Failure::Permanent, draw: 0.0, next: Next::NeedsLogin },
            LoggedIn,
            Token { at: S, ttl: 3600, draw: 0.0 },
            NeedsLogin(false),
            Deadline(Some(3301 * S)),
            attempt(2 * S, false),
        ],
    ),
    (
        "bootstrap: a grant that can log in does so at once; otherwise it needs login",
        G::Jwt,
        &[
            Bootstrap { at: 0 },
            attempt(0, true),
            Begin { at: 0, has_rt: false, sends: Some(Request::Login) },
        ],
    ),
    (
        "authorization_code: no token without a person; a tick sends nothing",
        G::Code,
        &[
            Bootstrap { at: 0 },
            NeedsLogin(true),
            attempt(0, false),
            Tick { at: S, draw: 0.0 },
            Begin { at: S, has_rt: false, sends: None },
            Gate { at: S, expect: S },
            attempt(2 * S, false),
        ],
    ),
    (
        "refresh_token grant: the configured token bootstraps",
        G::Rt,
        &[Bootstrap { at: 0 }, Begin { at: 0, has_rt: false, sends: Some(Request::Login) }],
    ),
    (
        "a refresh in flight at a stop is replayed at once, before the deadline",
        G::Jwt,
        &[Token { at: 0, ttl: 3600, draw: 0.0 }, Replay { at: S }, attempt(S, true)],
    ),
    (
        // Issue 14: Google's refresh token dies after 180 days unused, Xero's after 60. The
        // access deadline refreshes an hour-long token long before; a month-long one (a long
        // `access_token_lifetime`) would be refreshed too late, whatever the schedule.
        "an access token that outlives the refresh token's idle expiry is refreshed before it",
        G::Jwt,
        &[
            Token { at: 0, ttl: 30 * 86_400, draw: 0.0 },
            Deadline(Some(IDLE_DEADLINE)),
            Wake { at: 0, expect: 900 * S },
            attempt(IDLE_DEADLINE - 1, false),
            attempt(IDLE_DEADLINE, true),
            Begin { at: IDLE_DEADLINE, has_rt: true, sends: Some(Request::Refresh) },
            // Each refresh uses the refresh token: its idle clock starts again.
            Succeed { at: IDLE_DEADLINE, ttl: 30 * 86_400, draw: 0.0 },
            Deadline(Some(2 * IDLE_DEADLINE)),
            attempt(2 * IDLE_DEADLINE - 1, false),
        ],
    ),
    (
        "the idle deadline is not kept while the token needs login",
        G::Rt,
        &[
            Token { at: 0, ttl: 30 * 86_400, draw: 0.0 },
            Fail { at: 0, failure: Failure::DeadChain, draw: 0.0, next: Next::NeedsLogin },
            Deadline(None),
            attempt(IDLE_DEADLINE, false),
        ],
    ),
    (
        "a store failure (etcd) retries on its own short backoff",
        G::Jwt,
        &[Fail { at: 0, failure: Failure::Store, draw: 0.0, next: retry(100) }, attempt(100, true)],
    ),
    (
        "a held token (unreadable pair) drops what was pending and has no deadline",
        G::Jwt,
        &[
            Token { at: 0, ttl: 10, draw: 0.0 },
            RefreshNow { at: 0 },
            Hold,
            NeedsLogin(true),
            attempt(20 * S, false),
        ],
    ),
    (
        // The one place the modes differ (`ChainHome`): one host must not move the chain
        // further from its state file; a cluster's chain lives in etcd, not in this file.
        "a refresh while the state file is behind: held on one host, not in a cluster",
        G::Jwt,
        &[
            RefreshNow { at: 0 },
            Attempt { at: 0, behind: true, single: false, cluster: true },
            Attempt { at: 0, behind: false, single: true, cluster: true },
        ],
    ),
    (
        // Issue 17 #5: a lost login reply retried at the refresh backoff (100 ms here) burnt
        // RingCentral's 5 sessions in 15 s. The server may have started a session each time.
        "a login that failed transiently backs off in minutes, not seconds",
        G::Jwt,
        &[
            Bootstrap { at: 0 },
            Begin { at: 0, has_rt: false, sends: Some(Request::Login) },
            Fail { at: 0, failure: transient(None), draw: 0.0, next: retry(60 * S) },
            attempt(60 * S - 1, false),
            attempt(60 * S, true),
            Begin { at: 60 * S, has_rt: false, sends: Some(Request::Login) },
            Fail { at: 60 * S, failure: transient(None), draw: 0.999, next: retry(239_880) },
            Begin { at: 400 * S, has_rt: false, sends: Some(Request::Login) },
            Fail { at: 400 * S, failure: transient(None), draw: 0.0, next: retry(240 * S) },
            // The fourth within the hour: the session budget (3) holds it.
            Begin { at: 700 * S, has_rt: false, sends: None },
            Held(Some(3600 * S)),
        ],
    ),
    (
        "a failed refresh after a login backs off as a refresh again",
        G::Jwt,
        &[
            Begin { at: 0, has_rt: false, sends: Some(Request::Login) },
            Succeed { at: 0, ttl: 3600, draw: 0.0 },
            RefreshNow { at: S },
            Begin { at: S, has_rt: true, sends: Some(Request::Refresh) },
            Fail { at: S, failure: transient(None), draw: 0.0, next: retry(500) },
        ],
    ),
    (
        // SIGUSR1 clears a backoff, so a signal storm could send a login per signal.
        "the session budget: a fourth login in an hour waits for the first to leave it",
        G::Jwt,
        &[
            Bootstrap { at: 0 },
            Begin { at: 0, has_rt: false, sends: Some(Request::Login) },
            Fail { at: 0, failure: transient(None), draw: 0.0, next: retry(60 * S) },
            RefreshNow { at: S },
            Begin { at: S, has_rt: false, sends: Some(Request::Login) },
            Fail { at: S, failure: transient(None), draw: 0.0, next: retry(120 * S) },
            RefreshNow { at: 2 * S },
            Begin { at: 2 * S, has_rt: false, sends: Some(Request::Login) },
            Held(None),
            RefreshNow { at: 3 * S },
            Begin { at: 3 * S, has_rt: false, sends: None },
            Held(Some(3600 * S)),
            Gate { at: 3 * S, expect: 3600 * S },
            Wake { at: 3 * S, expect: 903 * S },
            attempt(3599 * S, false),
            // Still wanted: it goes out once the first login leaves the hour.
            attempt(3600 * S, true),
            Begin { at: 3600 * S, has_rt: false, sends: Some(Request::Login) },
            Held(None),
        ],
    ),
    (
        "a dead chain's re-login counts against the session budget too; a person's login clears the hold",
        G::Jwt,
        &[
            Begin { at: 0, has_rt: false, sends: Some(Request::Login) },
            Begin { at: S, has_rt: false, sends: Some(Request::Login) },
            Begin { at: 2 * S, has_rt: false, sends: Some(Request::Login) },
            Succeed { at: 2 * S, ttl: 3600, draw: 0.0 },
            RefreshNow { at: 10 * S },
            Begin { at: 10 * S, has_rt: true, sends: Some(Request::Refresh) },
            Fail { at: 10 * S, failure: Failure::DeadChain, draw: 0.0, next: Next::Relogin },
            // Due at once; `begin` finds the budget spent, and then the gate holds until then.
            attempt(10 * S, true),
            Begin { at: 10 * S, has_rt: true, sends: None },
            Held(Some(3600 * S)),
            attempt(11 * S, false),
            LoggedIn,
            Held(None),
            RefreshNow { at: 11 * S },
            Begin { at: 11 * S, has_rt: true, sends: Some(Request::Refresh) },
        ],
    ),
    (
        // Sending a configured refresh token continues the session it came from.
        "refresh_token grant: its logins start no session, so no budget and no minutes-long wait",
        G::Rt,
        &[
            Bootstrap { at: 0 },
            Begin { at: 0, has_rt: false, sends: Some(Request::Login) },
            Fail { at: 0, failure: transient(None), draw: 0.0, next: retry(500) },
            Begin { at: S, has_rt: false, sends: Some(Request::Login) },
            Begin { at: 2 * S, has_rt: false, sends: Some(Request::Login) },
            Begin { at: 3 * S, has_rt: false, sends: Some(Request::Login) },
            Held(None),
        ],
    ),
];

#[test]
fn the_decision_table_holds_for_one_host_and_for_a_cluster_leader() {
    for home in [ChainHome::StateFile, ChainHome::Etcd] {
        for (name, grant, steps) in TABLE {
            run(name, home, *grant, steps);
        }
    }
}

#[test]
fn a_new_leader_imports_the_budget_and_retry_after_across_hosts() {
    let c = Clock::new();
    let mut old = Policy::new(rules(ChainHome::Etcd, G::Jwt));
    for s in 0..5 {
        old.begin(c.now(s * S), true);
    }
    old.on_failure(c.now(5 * S), transient(Some(30)), 0.0);
    let stored = old.export_budget(c.now(6 * S), c.wall(6 * S));
    assert_eq!(stored.sent.len(), 5);
    assert_eq!(stored.not_before, Some(c.wall(35 * S)));
    // Another host: its own monotonic clock, the same wall clock.
    let other = Clock { t0: Instant::now() + Duration::from_secs(1000), wall0: c.wall0 };
    let mut new = Policy::new(rules(ChainHome::Etcd, G::Jwt));
    assert_eq!(new.import_budget(&stored, other.now(7 * S), other.wall(7 * S)), stored.not_before);
    new.refresh_now(other.now(7 * S));
    assert_eq!(other.ms(new.gate(other.now(7 * S))), 60 * S, "the first request leaves at 60 s");
    assert!(!new.should_attempt(other.now(59 * S), other.wall(59 * S), false));
    assert!(new.should_attempt(other.now(60 * S), other.wall(60 * S), false));
    // A Retry-After already over is not imported.
    let late = Policy::new(rules(ChainHome::Etcd, G::Jwt)).import_budget(
        &stored,
        other.now(40 * S),
        other.wall(40 * S),
    );
    assert_eq!(late, None);
}

#[test]
fn write_retries_back_off_to_ten_seconds_and_reset() {
    let c = Clock::new();
    let mut w = WriteRetry::default();
    assert!(w.due(c.now(0)) && w.at().is_none());
    let expect = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
    for (i, ms) in expect.iter().enumerate() {
        w.failed(c.now(0), 0.0);
        assert_eq!(w.at(), Some(c.now(*ms)), "failure {}", i + 1);
    }
    assert!(!w.due(c.now(4999)) && w.due(c.now(5000)));
    w.succeeded();
    assert_eq!(w.at(), None);
}

#[test]
fn the_session_budget_outlives_a_restart_and_a_change_of_leader() {
    let c = Clock::new();
    let mut old = Policy::new(rules(ChainHome::Etcd, G::Jwt));
    for m in [0, 1, 2] {
        assert_eq!(old.begin(c.now(m * 60 * S), false), Some(Request::Login));
    }
    // Another process (a restart, or another host): its own monotonic clock, the same wall.
    let other = Clock { t0: Instant::now() + Duration::from_secs(5000), wall0: c.wall0 };
    let at = other.now(10 * 60 * S);
    for home in [ChainHome::StateFile, ChainHome::Etcd] {
        let mut new = Policy::new(rules(home, G::Jwt));
        let logins: Vec<_> =
            old.recent_logins(c.now(10 * 60 * S)).map(|t| c.wall(c.ms(t))).collect();
        new.import_logins(&logins, at, other.wall(10 * 60 * S));
        assert_eq!(new.begin(at, false), None, "{home:?}: the budget was spent before");
        assert_eq!(new.logins_held_until().map(|t| other.ms(t)), Some(3600 * S), "{home:?}");
    }
    let stored = old.export_budget(c.now(10 * 60 * S), c.wall(10 * 60 * S));
    assert_eq!(stored.logins, [c.wall(0), c.wall(60 * S), c.wall(120 * S)]);
    let mut new = Policy::new(rules(ChainHome::Etcd, G::Jwt));
    new.import_budget(&stored, at, other.wall(10 * 60 * S));
    assert_eq!(new.begin(at, false), None);
    // Logins older than an hour are not carried over.
    let mut late = Policy::new(rules(ChainHome::StateFile, G::Jwt));
    late.import_logins(&stored.logins, other.now(3601 * S), other.wall(3601 * S));
    assert_eq!(late.begin(other.now(3601 * S), false), Some(Request::Login));
}
