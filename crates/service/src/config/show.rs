//! `quotebridge config show`: the effective configuration as TOML, in the
//! order of `config/default.toml`, secrets redacted, each value followed by
//! where it came from.

use std::fmt::Write;

use config::{Map, Value, ValueKind};

use super::origins::{Origins, leaf_keys};
use super::{DEFAULTS, redact_url};

/// The merged configuration `merged`, as TOML with origins in comments.
#[must_use]
pub fn render(merged: &Map<String, Value>, origins: &Origins) -> String {
    let mut out = String::new();
    let mut section = String::new();
    for key in ordered_keys(merged) {
        let (name, field) = key.split_once('.').unwrap_or(("", key.as_str()));
        if name != section {
            if !out.is_empty() {
                out.push('\n');
            }
            let _ = writeln!(out, "[{name}]");
            section = name.to_owned();
        }
        let Some(value) = lookup(merged, &key) else {
            continue;
        };
        let shown = redacted(&key, value);
        // The origin on one line, whatever the file's name holds.
        let origin = origins.of(&key).to_string().escape_debug().to_string();
        let _ = writeln!(out, "{field} = {shown}  # {origin}");
    }
    out
}

/// Every key, in the order the defaults file lists them (every key has a
/// default, so none is left out).
fn ordered_keys(merged: &Map<String, Value>) -> Vec<String> {
    let mut order = Vec::new();
    let mut section = "";
    for line in DEFAULTS.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name;
        } else if let Some((field, _)) = line.split_once('=')
            && !line.starts_with('#')
        {
            order.push(format!("{section}.{}", field.trim()));
        }
    }
    let mut rest: Vec<String> = leaf_keys(merged)
        .into_iter()
        .filter(|key| !order.contains(key))
        .collect();
    rest.sort();
    order.extend(rest);
    order
}

fn lookup<'a>(table: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let value = table.get(first)?;
    if rest.is_empty() {
        return Some(value);
    }
    match &value.kind {
        ValueKind::Table(inner) => lookup(inner, rest),
        _ => None,
    }
}

/// The value as TOML, with secrets hidden: passwords in Redis URLs, the
/// JWT secret, and the tokens of `auth.tokens`.
fn redacted(key: &str, value: &Value) -> String {
    match (key, &value.kind) {
        ("redis.url", ValueKind::String(url)) => toml_string(&redact_url(url)),
        // Whatever its type: a secret of digits reads as a number.
        ("auth.jwt_secret", kind) if !matches!(kind, ValueKind::String(s) if s.is_empty()) => {
            toml_string("***")
        }
        ("redis.cluster_nodes", ValueKind::Array(urls)) => array(urls, |url| match &url.kind {
            ValueKind::String(url) => toml_string(&redact_url(url)),
            _ => toml(url),
        }),
        ("auth.tokens", ValueKind::Array(tokens)) => array(tokens, |entry| match &entry.kind {
            ValueKind::String(entry) => {
                let code = entry.split_once('=').map_or("", |(code, _)| code);
                toml_string(&format!("{code}=***"))
            }
            _ => toml(entry),
        }),
        _ => toml(value),
    }
}

fn array(values: &[Value], each: impl Fn(&Value) -> String) -> String {
    let items: Vec<String> = values.iter().map(each).collect();
    format!("[{}]", items.join(", "))
}

fn toml(value: &Value) -> String {
    match &value.kind {
        ValueKind::Nil => toml_string(""),
        ValueKind::Boolean(b) => b.to_string(),
        ValueKind::I64(n) => n.to_string(),
        ValueKind::I128(n) => n.to_string(),
        ValueKind::U64(n) => n.to_string(),
        ValueKind::U128(n) => n.to_string(),
        // TOML spells these `nan` and `inf`.
        ValueKind::Float(x) if x.is_nan() => "nan".to_owned(),
        ValueKind::Float(x) if x.is_infinite() => if *x > 0.0 { "inf" } else { "-inf" }.to_owned(),
        ValueKind::Float(x) => format!("{x:?}"),
        ValueKind::String(s) => toml_string(s),
        ValueKind::Array(values) => array(values, toml),
        ValueKind::Table(table) => {
            let mut entries: Vec<String> = table
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_string(k), toml(v)))
                .collect();
            entries.sort();
            format!("{{ {} }}", entries.join(", "))
        }
    }
}

/// A TOML basic string (JSON's escapes are TOML's).
fn toml_string(text: &str) -> String {
    // JSON leaves DEL as it is; TOML forbids it.
    serde_json::to_string(text)
        .unwrap_or_else(|_| "\"\"".into())
        .replace('\u{7f}', "\\u007F")
}
