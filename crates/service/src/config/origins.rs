//! Where each configuration value came from: the compiled-in defaults, the
//! file, or an environment variable. Errors name it, and `config show`
//! prints it beside every value.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Config, File, FileFormat, Map, Value, ValueKind};

/// The prefix of every setting's environment variable, before `__`.
pub const ENV_PREFIX: &str = "QUOTEBRIDGE";

/// Where one value came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// `config/default.toml`, compiled in.
    Default,
    /// The `--config` file.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This command-line flag (`--redis-url`, `--listen`).
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the defaults"),
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Env(var) => f.write_str(var),
            Origin::Flag(flag) => f.write_str(flag),
        }
    }
}

/// The origins of every key the file or the environment sets.
#[derive(Debug, Default)]
pub struct Origins {
    /// `section.key` → origin; keys absent here come from the defaults.
    keys: HashMap<String, Origin>,
}

impl Origins {
    /// The origins for `file` (if any) and the `QUOTEBRIDGE__…` variables
    /// of `env`. A file that cannot be read or parsed adds nothing here:
    /// loading it reports that.
    pub fn new(file: Option<&Path>, env: &HashMap<String, String>) -> Self {
        let mut keys = HashMap::new();
        if let Some(path) = file {
            let table = Config::builder()
                .add_source(File::from(path).format(FileFormat::Toml))
                .build()
                .and_then(|config| config.try_deserialize::<Map<String, Value>>());
            if let Ok(table) = table {
                for key in leaf_keys(&table) {
                    keys.insert(key, Origin::File(path.to_owned()));
                }
            }
        }
        for var in env.keys() {
            if let Some(key) = key_of_env(var) {
                keys.insert(key, Origin::Env(var.clone()));
            }
        }
        Self { keys }
    }

    /// Notes that `key`'s value came from the command-line `flag`.
    pub fn set_flag(&mut self, key: &str, flag: &'static str) {
        self.keys.insert(key.to_owned(), Origin::Flag(flag));
    }

    /// Where the value of `key` (`section.key`) came from; for a section,
    /// where a key in it came from.
    pub fn of(&self, key: &str) -> Origin {
        if let Some(origin) = self.keys.get(key) {
            return origin.clone();
        }
        let section = format!("{key}.");
        let mut within: Vec<(&String, &Origin)> = self
            .keys
            .iter()
            .filter(|(name, _)| name.starts_with(&section))
            .collect();
        within.sort();
        within
            .first()
            .map_or(Origin::Default, |(_, origin)| (*origin).clone())
    }

    /// The keys set outside the defaults.
    pub fn keys(&self) -> HashSet<&str> {
        self.keys.keys().map(String::as_str).collect()
    }
}

/// The environment variable that sets `key`: `sma.window` →
/// `QUOTEBRIDGE__SMA__WINDOW`.
#[must_use]
pub fn env_var_of(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase())
}

/// The key a `QUOTEBRIDGE__SECTION__KEY` variable sets, if it is one.
pub(super) fn key_of_env(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_PREFIX)?.strip_prefix("__")?;
    Some(
        rest.split("__")
            .collect::<Vec<_>>()
            .join(".")
            .to_lowercase(),
    )
}

/// `section.key` for every value in `table` that is not itself a table.
pub(super) fn leaf_keys(table: &Map<String, Value>) -> Vec<String> {
    let mut keys = Vec::new();
    for (name, value) in table {
        match &value.kind {
            ValueKind::Table(inner) => {
                keys.extend(leaf_keys(inner).into_iter().map(|k| format!("{name}.{k}")));
            }
            _ => keys.push(name.clone()),
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_variables_map_to_keys_and_back() {
        assert_eq!(
            key_of_env("QUOTEBRIDGE__SMA__WINDOW").as_deref(),
            Some("sma.window")
        );
        assert_eq!(
            env_var_of("redis.input_mode"),
            "QUOTEBRIDGE__REDIS__INPUT_MODE"
        );
        assert_eq!(key_of_env("QUOTEBRIDGEX__SMA"), None);
        assert_eq!(key_of_env("PATH"), None);
    }

    #[test]
    fn the_environment_wins_over_the_file_and_the_file_over_the_defaults() {
        let dir = std::env::temp_dir().join(format!("quotebridge-origins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("bridge.toml");
        std::fs::write(&file, "[sma]\nwindow = 5\nemit_partial = true\n").expect("write");
        let env = HashMap::from([("QUOTEBRIDGE__SMA__WINDOW".to_owned(), "7".to_owned())]);
        let origins = Origins::new(Some(&file), &env);
        assert_eq!(
            origins.of("sma.window"),
            Origin::Env("QUOTEBRIDGE__SMA__WINDOW".into())
        );
        assert_eq!(origins.of("sma.emit_partial"), Origin::File(file.clone()));
        assert_eq!(origins.of("sma.max_keys"), Origin::Default);
        std::fs::remove_dir_all(&dir).ok();
    }
}
