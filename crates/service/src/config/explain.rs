//! Configuration errors in words a person understands, on one line, naming
//! the key and where its value came from. The config crate's own messages
//! speak of its internals ("enum InputMode does not have variant
//! constructor foo") and TOML's span several lines.

use std::path::Path;

use clap::ValueEnum;

use super::origins::Origins;
use super::{AuthMode, ConfigError, InputMode, SlowConsumer};
use crate::topology::Role;

/// `err`, from loading `file` (if any), explained.
pub(super) fn explain(
    err: config::ConfigError,
    file: Option<&Path>,
    origins: &Origins,
) -> ConfigError {
    use config::ConfigError as Raw;
    match err {
        Raw::FileParse { cause, .. } => {
            let path = file.map_or_else(
                || "the configuration file".into(),
                |p| p.display().to_string(),
            );
            ConfigError::File(toml_in_one_line(&path, &cause.to_string()))
        }
        Raw::Type {
            unexpected,
            expected,
            key: Some(key),
            ..
        } => {
            // A secret's value is never repeated, even a wrongly typed one.
            let message = if is_secret(&key) {
                format!("expected {expected}")
            } else if let Some(message) = out_of_type(&unexpected.to_string(), expected) {
                message
            } else {
                format!("expected {expected}, got {unexpected}")
            };
            keyed(&key, origins, message)
        }
        Raw::At {
            error,
            key: Some(key),
            ..
        } => match *error {
            Raw::Message(message) if !message.contains(" for key `") => {
                message_explained(&format!("{message} for key `{key}`"), origins)
            }
            error => match explain(error, file, origins) {
                ConfigError::Other(message) => keyed(&key, origins, message),
                explained => explained,
            },
        },
        Raw::At { error, .. } => explain(*error, file, origins),
        Raw::Message(message) => message_explained(&message, origins),
        other => ConfigError::Other(one_line(&other.to_string())),
    }
}

/// A whole number the key's type cannot hold, said as a bound rather than
/// as types: a negative one for a count ("must not be negative", not
/// "expected an unsigned integer, got string"), or one past the type's
/// largest ("must be at most 4294967295"). `None` for any other mismatch.
fn out_of_type(unexpected: &str, expected: &str) -> Option<String> {
    // Every whole-number setting is unsigned; a variable's text that does
    // not read as one is reported as "expected an integer".
    if !expected.contains("integer") {
        return None;
    }
    // The config crate writes what it found as "64-bit integer `-3`" or,
    // for a variable's text, "string \"-5\"".
    let number = unexpected
        .split(['`', '"'])
        .nth(1)
        .filter(|_| unexpected.contains("integer") || unexpected.starts_with("string"))?;
    let value: i128 = number.trim().parse().ok()?;
    if value < 0 {
        return Some(format!("must not be negative (got {value})"));
    }
    let bits: u32 = expected
        .split_whitespace()
        .find_map(|word| word.parse().ok())
        .filter(|_| expected.contains("unsigned"))?;
    let max = 1i128.checked_shl(bits)? - 1;
    (value > max).then(|| format!("must be at most {max} (got {value})"))
}

fn keyed(key: &str, origins: &Origins, message: String) -> ConfigError {
    ConfigError::Key {
        key: key.to_owned(),
        origin: origins.of(key).to_string(),
        message,
    }
}

/// The config crate's free-form messages: an unknown key, a value that is
/// not one of an enum's, or anything with `for key` at its end.
fn message_explained(message: &str, origins: &Origins) -> ConfigError {
    let (body, section) = match message.rsplit_once(" for key `") {
        Some((body, key)) => (body, key.trim_end_matches('`')),
        None => (message, ""),
    };
    let within = |name: &str| {
        if section.is_empty() {
            name.to_owned()
        } else {
            format!("{section}.{name}")
        }
    };
    if let Some(rest) = body.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let known = expected
            .trim_start_matches(", expected one of ")
            .trim_start_matches(", expected ")
            .replace('`', "");
        let key = within(field);
        let place = if section.is_empty() {
            "the sections are".to_owned()
        } else {
            format!("[{section}] has")
        };
        return keyed(&key, origins, format!("no such key; {place} {known}"));
    }
    if let Some((_, value)) = body.split_once(" does not have variant constructor ") {
        let allowed = enum_values(section).map_or_else(String::new, |values| {
            format!("; expected one of: {}", values.join(", "))
        });
        return keyed(
            section,
            origins,
            format!("{value:?} is not a valid value{allowed}"),
        );
    }
    if section.is_empty() {
        ConfigError::Other(one_line(body))
    } else if is_secret(section) {
        // "invalid type: string \"<the secret>\", expected …": keep only
        // what was expected.
        let expected = body
            .split_once(", expected ")
            .map_or_else(|| "a different value".to_owned(), |(_, e)| one_line(e));
        keyed(section, origins, format!("wrong type; expected {expected}"))
    } else {
        keyed(section, origins, one_line(body))
    }
}

/// The values an enum-valued key takes.
fn enum_values(key: &str) -> Option<Vec<String>> {
    fn names<T: ValueEnum>() -> Vec<String> {
        T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
            .collect()
    }
    match key {
        "redis.input_mode" => Some(names::<InputMode>()),
        "auth.mode" => Some(names::<AuthMode>()),
        "websocket.slow_consumer" => Some(names::<SlowConsumer>()),
        "node.role" => Some(names::<Role>()),
        _ => None,
    }
}

/// TOML's error (a header with line and column, the source line, a caret,
/// the message) as `path:line:column: message`.
fn toml_in_one_line(path: &str, error: &str) -> String {
    let position = error
        .lines()
        .next()
        .and_then(|first| first.split_once(" at line "))
        .and_then(|(_, at)| at.split_once(", column "))
        .and_then(|(line, column)| {
            Some((
                line.trim().parse::<u32>().ok()?,
                column.trim().parse::<u32>().ok()?,
            ))
        });
    // The message is the last line that is not part of the source excerpt.
    let message = error
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| {
            !line.is_empty()
                && !line.starts_with('|')
                && !line.contains(" | ")
                && !line.starts_with("in ")
        })
        .unwrap_or("not valid TOML");
    match position {
        Some((line, column)) => format!("{path}:{line}:{column}: {message}"),
        None => format!("{path}: {}", one_line(error)),
    }
}

fn one_line(text: &str) -> String {
    text.split('\n')
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether `key`'s value may hold a secret: the `[auth]` keys and the Redis
/// URLs (passwords).
pub(super) fn is_secret(key: &str) -> bool {
    key.starts_with("auth.") || key == "redis.url" || key.starts_with("redis.cluster_nodes")
}

/// `url` with its password replaced by `***`, for messages and `config
/// show`: the one in its user part, and a `pass`/`password` query
/// parameter (how a Unix socket URL carries it).
#[must_use]
pub fn redact_url(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((url, query)) => (url, Some(query)),
        None => (url, None),
    };
    let mut redacted = redact_userinfo(url);
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if matches!(name, "pass" | "password") => format!("{name}=***"),
                _ => param.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&params.join("&"));
    }
    redacted
}

fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let userinfo = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        // A lone name is a password to redis-rs when no user is given.
        None => "***".to_owned(),
    };
    format!("{scheme}://{userinfo}@{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_the_rest_kept() {
        assert_eq!(
            redact_url("redis://:s3cret@host:6379/2"),
            "redis://:***@host:6379/2"
        );
        assert_eq!(
            redact_url("redis://feeder:pw@host"),
            "redis://feeder:***@host"
        );
        assert_eq!(redact_url("redis://pw@host"), "redis://***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(
            redact_url("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("unix:///run/redis.sock?db=1&pass=s3cret"),
            "unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            redact_url("redis+unix:///r.sock?user=u&password=pw"),
            "redis+unix:///r.sock?user=u&password=***"
        );
    }

    #[test]
    fn toml_errors_become_one_line_with_line_and_column() {
        let error = "TOML parse error at line 2, column 10\n  |\n2 | window = \n  |          ^\nstring values must be quoted, expected literal string\n";
        assert_eq!(
            toml_in_one_line("bridge.toml", error),
            "bridge.toml:2:10: string values must be quoted, expected literal string"
        );
    }
}
