//! Reading kohya values: numbers as kohya writes them (numbers or numeric text, "" for not set), checked
//! against our ranges, and the layer of our keys they go into.

use super::Skipped;
use super::map::Mapper;
use crate::schema::{self, Number};
use crate::train::config::ConfigError;
use serde::Serialize;
use serde_json::Value;

/// A number as the file has it: exact when it is a whole number.
#[derive(Clone, Copy)]
pub(super) enum Num {
    Int(i128),
    Real(f64),
}

pub(super) fn num_of(v: &Value) -> Option<Num> {
    match v {
        Value::Number(n) => (n.as_i64().map(|i| Num::Int(i.into())))
            .or_else(|| n.as_u64().map(|u| Num::Int(u.into())))
            .or_else(|| n.as_f64().map(Num::Real)),
        Value::String(s) => {
            let s = s.trim();
            (s.parse::<i128>().ok().map(Num::Int)).or_else(|| s.parse::<f64>().ok().map(Num::Real))
        }
        _ => None,
    }
}

/// The value as the file writes it, shortened for a list.
pub(super) fn show(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(77).collect::<String>())
    } else {
        text
    }
}

/// Values that mean "off" or "not set" in kohya files: never worth a mention.
pub(super) fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => {
            let s = s.trim();
            s.is_empty()
                || ["false", "none"].contains(&s.to_ascii_lowercase().as_str())
                || s.parse::<f64>().is_ok_and(|f| f == 0.0)
        }
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// True when `v` is kohya's default `d` (numbers compared as numbers, text without case).
pub(super) fn is_default(v: &Value, d: &str) -> bool {
    if let (Some(n), Ok(d)) = (num_of(v), d.parse::<f64>()) {
        let n = match n {
            Num::Int(i) => i as f64,
            Num::Real(r) => r,
        };
        return n == d;
    }
    match v {
        Value::String(s) => s.trim().eq_ignore_ascii_case(d),
        Value::Bool(b) => b.to_string() == d,
        _ => false,
    }
}

/// `key=value` settings (`optimizer_args`, `network_args`) as (key, value) pairs.
pub(super) type KeyValues = Vec<(String, String)>;

pub(super) fn enum_value(v: impl Serialize) -> toml::Value {
    toml::Value::try_from(v).expect("a unit variant serializes as a string")
}

impl Mapper {
    /// The value of `key` unless it is absent, null or empty text (kohya's "not set"); marks it read.
    pub(super) fn get(&mut self, key: &str) -> Option<Value> {
        self.seen.insert(key.to_owned());
        match self.values.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(v) => Some(v.clone()),
        }
    }

    pub(super) fn refuse(&self, key: &str, v: &Value, must: &str) -> ConfigError {
        ConfigError(format!(
            "{}: `{key}` is {}: it must be {must}; fix it in the file",
            self.file,
            show(v)
        ))
    }

    pub(super) fn real(&mut self, key: &str) -> Result<Option<f64>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let r = match num_of(&v) {
            Some(Num::Int(i)) => i as f64,
            Some(Num::Real(r)) => r,
            None => return Err(self.refuse(key, &v, "a number")),
        };
        if !r.is_finite() {
            return Err(self.refuse(key, &v, "a finite number"));
        }
        Ok(Some(r))
    }

    /// A whole number (negative ones too, for the range check to name); fractions and numbers beyond 64 bits
    /// are refused.
    pub(super) fn whole(&mut self, key: &str) -> Result<Option<i128>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let i = match num_of(&v) {
            Some(Num::Int(i)) => i,
            // Within i128, so that the limit below names it.
            Some(Num::Real(r)) if r.is_finite() && r.fract() == 0.0 => r.clamp(-1e30, 1e30) as i128,
            _ => return Err(self.refuse(key, &v, "a whole number")),
        };
        if i.unsigned_abs() >= 1 << 64 {
            return Err(self.refuse(key, &v, "a whole number below 2^64"));
        }
        Ok(Some(i))
    }

    pub(super) fn flag(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match &v {
            Value::Bool(b) => Ok(Some(*b)),
            Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Ok(Some(true)),
            Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Ok(Some(false)),
            _ => Err(self.refuse(key, &v, "true or false")),
        }
    }

    pub(super) fn text(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v {
            Value::String(s) => Ok(Some(s.trim().to_owned())),
            other => Err(self.refuse(key, &other, "text")),
        }
    }

    /// Lists `key` (with its value in the file) as not applied.
    pub(super) fn skip(&mut self, key: &str, why: impl Into<String>) {
        let value = self.values.get(key).map_or_else(String::new, show);
        self.skip_value(key, value, why);
    }

    pub(super) fn skip_value(&mut self, key: &str, value: String, why: impl Into<String>) {
        self.seen.insert(key.to_owned());
        self.skipped.push(Skipped {
            key: key.to_owned(),
            value,
            why: why.into(),
        });
    }

    pub(super) fn set(&mut self, ours: &str, value: toml::Value) {
        let (section, key) = ours.split_once('.').expect("a section.key name");
        let table = self
            .layer
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = table {
            t.insert(key.to_owned(), value);
        }
    }

    /// Sets `ours` to `n` when our range admits it; else lists `kohya` with the range. True when set.
    pub(super) fn set_number(&mut self, kohya: &str, ours: &str, n: Number) -> bool {
        let field = schema::field(ours).expect("a key of the schema");
        let value = match n {
            Number::Whole(w) => i64::try_from(w).ok().map(toml::Value::Integer),
            Number::Real(r) => Some(toml::Value::Float(r)),
        };
        match value {
            Some(value) if field.bound().admits(n) => {
                self.set(ours, value);
                true
            }
            _ => {
                let why = format!(
                    "out of range: lora-studio's `{ours}` admits {}",
                    field.bound().describe()
                );
                self.skip(kohya, why);
                false
            }
        }
    }

    pub(super) fn set_whole(&mut self, kohya: &str, ours: &str, i: i128) -> Option<u64> {
        let w = u64::try_from(i).unwrap_or(u64::MAX);
        let n = if i < 0 {
            Number::Real(i as f64)
        } else {
            Number::Whole(w)
        };
        self.set_number(kohya, ours, n).then_some(w)
    }

    pub(super) fn put_whole(
        &mut self,
        kohya: &str,
        ours: &str,
    ) -> Result<Option<u64>, ConfigError> {
        Ok(match self.whole(kohya)? {
            Some(i) => self.set_whole(kohya, ours, i),
            None => None,
        })
    }

    pub(super) fn put_real(&mut self, kohya: &str, ours: &str) -> Result<(), ConfigError> {
        if let Some(r) = self.real(kohya)? {
            self.set_number(kohya, ours, Number::Real(r));
        }
        Ok(())
    }

    pub(super) fn put_flag(&mut self, kohya: &str, ours: &str) -> Result<(), ConfigError> {
        if let Some(b) = self.flag(kohya)? {
            self.set(ours, toml::Value::Boolean(b));
        }
        Ok(())
    }

    /// Text and paths are kept as written (kohya configs hold absolute paths).
    pub(super) fn put_text(&mut self, kohya: &str, ours: &str) -> Result<(), ConfigError> {
        if let Some(s) = self.text(kohya)? {
            self.set(ours, toml::Value::String(s));
        }
        Ok(())
    }

    /// `key=value` settings: the GUI's space-separated text, or sd-scripts' list of them.
    pub(super) fn key_values(&mut self, key: &str) -> Result<KeyValues, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let items: Vec<String> = match &v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => {
                let texts: Option<Vec<String>> =
                    a.iter().map(|i| i.as_str().map(str::to_owned)).collect();
                texts.ok_or_else(|| self.refuse(key, &v, "a list of key=value texts"))?
            }
            _ => return Err(self.refuse(key, &v, "key=value texts")),
        };
        let mut out = Vec::new();
        for token in items.iter().flat_map(|s| s.split_whitespace()) {
            let token = token.replace('"', "");
            match token.split_once('=') {
                Some((k, v)) if !k.is_empty() => out.push((k.to_owned(), v.to_owned())),
                _ => {
                    return Err(self.refuse(
                        key,
                        &Value::String(token),
                        "key=value, such as weight_decay=0.01",
                    ));
                }
            }
        }
        Ok(out)
    }
}
