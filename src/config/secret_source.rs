//! Where a secret comes from: a literal, `{ env }`, `{ file }` or `{ credential }` (systemd
//! `LoadCredential=`), and reading it.

use crate::secret::Secret;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use std::fmt;
use std::path::PathBuf;

/// The raw TOML value: a string or a one-key table. Its `Debug` never shows a literal.
#[derive(Clone)]
pub(super) enum RawSecret {
    Literal(Secret),
    Env(String),
    File(String),
    Credential(String),
}

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawSecretVisitor)
    }
}

struct RawSecretVisitor;

impl<'de> Visitor<'de> for RawSecretVisitor {
    type Value = RawSecret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, or a table with one of `env`, `file`, `credential`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSecret, E> {
        Ok(RawSecret::Literal(Secret::new(v)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSecret, A::Error> {
        let Some((key, value)) = map.next_entry::<String, String>()? else {
            return Err(de::Error::custom(
                "empty secret table; use { env = \"VAR\" }, { file = \"/path\" } or { credential = \"name\" }",
            ));
        };
        if map.next_key::<String>()?.is_some() {
            return Err(de::Error::custom(
                "a secret table takes exactly one of `env`, `file`, `credential`",
            ));
        }
        match key.as_str() {
            "env" => Ok(RawSecret::Env(value)),
            "file" => Ok(RawSecret::File(value)),
            "credential" => Ok(RawSecret::Credential(value)),
            other => Err(de::Error::custom(format!(
                "unknown secret source `{other}`; valid: `env`, `file`, `credential`"
            ))),
        }
    }
}

/// A validated secret source, resolvable again on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Literal(Secret),
    Env(String),
    File(PathBuf),
    Credential(String),
}

impl SecretSource {
    pub(super) fn from_raw(raw: RawSecret) -> Self {
        match raw {
            RawSecret::Literal(s) => Self::Literal(s),
            RawSecret::Env(v) => Self::Env(v),
            RawSecret::File(p) => Self::File(p.into()),
            RawSecret::Credential(n) => Self::Credential(n),
        }
    }

    /// Reads the secret. Errors say where it was looked for, never what was found.
    pub fn resolve(&self) -> Result<Secret, String> {
        let value = match self {
            // A trailing newline is never part of a secret (`echo` and heredocs add one; the
            // server would answer a bare invalid_client): trimmed from every source alike.
            Self::Literal(s) => return non_empty(trim_newlines(s.expose()), "the literal"),
            Self::Env(var) => trim_newlines(
                &std::env::var(var)
                    .map_err(|_| format!("environment variable {var} is not set (or not UTF-8)"))?,
            ),
            Self::File(path) => read(path)?,
            Self::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    format!("credential {name:?} needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)")
                })?;
                read(&PathBuf::from(dir).join(name))?
            }
        };
        non_empty(value, "the secret")
    }
}

/// A secret file: a regular file of at most 1 MiB (a FIFO or device would block or flood
/// a SIGHUP reload), UTF-8, trailing newlines trimmed.
fn read(path: &std::path::Path) -> Result<String, String> {
    let bytes = crate::store::read_regular(path, 1 << 20)
        .map_err(|e| format!("cannot read secret file {}: {e}", crate::text::path(path)))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("secret file {} is not UTF-8", crate::text::path(path)))?;
    Ok(trim_newlines(&text))
}

fn trim_newlines(s: &str) -> String {
    s.trim_end_matches(['\n', '\r']).to_string()
}

fn non_empty(value: String, what: &str) -> Result<Secret, String> {
    if value.trim().is_empty() { Err(format!("{what} is empty")) } else { Ok(Secret::new(value)) }
}

/// A secret the config names: where it comes from, where the config says so (for errors),
/// and its value once `Config::resolve_secrets` has read it. Parsing reads nothing, so
/// `check`, `status`, `token` and `watch` work where the secrets do not exist (outside the
/// unit that holds the `{ credential = .. }` files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSecret {
    source: SecretSource,
    key: String,
    line: usize,
    value: Option<Secret>,
}

impl ConfigSecret {
    pub(super) fn new(source: SecretSource, key: String, line: usize) -> Self {
        Self { source, key, line, value: None }
    }

    /// The config line that names it.
    pub(super) fn line(&self) -> usize {
        self.line
    }

    /// Where the value comes from.
    pub fn source(&self) -> &SecretSource {
        &self.source
    }

    /// The value. Only the commands that use a secret (`run`, `login`, `demo`) call this, and
    /// they resolve first: calling it on an unresolved config is a bug, not an input error.
    pub fn get(&self) -> &Secret {
        self.value
            .as_ref()
            .unwrap_or_else(|| panic!("secret `{}` used before Config::resolve_secrets", self.key))
    }

    /// Reads the value, or says which file, line and key could not be resolved.
    pub(super) fn resolve(&mut self, file: &std::path::Path) -> Result<(), super::ConfigError> {
        let value = self.source.resolve().map_err(|message| super::ConfigError {
            file: file.to_path_buf(),
            line: Some(self.line),
            key: self.key.clone(),
            message,
        })?;
        self.value = Some(value);
        Ok(())
    }

    /// How `tokend check` shows it: the source, never the value.
    pub fn describe(&self) -> String {
        match &self.source {
            SecretSource::Literal(_) => "set in the config".into(),
            SecretSource::Env(v) => format!("from environment variable {v}"),
            SecretSource::File(p) => format!("from file {}", p.display()),
            SecretSource::Credential(n) => format!("from systemd credential {n:?}"),
        }
    }
}
