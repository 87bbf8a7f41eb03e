//! Timestamps on disk: RFC 3339, UTC, millisecond precision.

/// `#[serde(with = "crate::time::rfc3339")]` for `DateTime<Utc>`.
pub mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// The same for `Option<DateTime<Utc>>`.
pub mod rfc3339_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::rfc3339")] DateTime<Utc>);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

/// Formats a span of time for people: "59m 58s", "6d 23h", "expired 3s ago".
pub fn left(until: chrono::DateTime<chrono::Utc>, now: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (until - now).num_seconds();
    let fmt = |s: i64| {
        let s = s.unsigned_abs();
        let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
        match (d, h, m) {
            (0, 0, 0) => format!("{sec}s"),
            (0, 0, _) => format!("{m}m {sec}s"),
            (0, _, _) => format!("{h}h {m}m"),
            _ => format!("{d}d {h}h"),
        }
    };
    if secs >= 0 { fmt(secs) } else { format!("expired {} ago", fmt(secs)) }
}
