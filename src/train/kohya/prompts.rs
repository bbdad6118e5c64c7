//! sd-scripts sample prompts: one prompt a line (`#` lines and empty ones skipped), options after ` --`:
//! `--n` negative prompt, `--w`/`--h` size, `--d` seed, `--s` steps, `--l` guidance scale. kohya's defaults for
//! the ones a line leaves out: 512×512, 30 steps, scale 7.5 (the seed is random there; ours stays fixed).

use crate::schema::{self, Field, Number};

pub(super) struct Parsed {
    /// `[[sampling.prompts]]` tables.
    pub prompts: Vec<toml::Table>,
    /// What was left out, as (the option as written, why).
    pub problems: Vec<(String, String)>,
}

pub(super) fn parse(text: &str) -> Parsed {
    let mut parsed = Parsed {
        prompts: Vec::new(),
        problems: Vec::new(),
    };
    let lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    for (i, line) in lines.enumerate() {
        let mut parts = line.split(" --");
        let mut table = toml::Table::new();
        let prompt = parts.next().unwrap_or_default().trim();
        table.insert("prompt".into(), toml::Value::String(prompt.to_owned()));
        for (key, value) in [("width", 512), ("height", 512), ("steps", 30)] {
            table.insert(key.into(), toml::Value::Integer(value));
        }
        table.insert("cfg".into(), toml::Value::Float(7.5));
        for option in parts {
            let (name, value) = option.split_once(' ').unwrap_or((option, ""));
            let value = value.trim();
            let shown = format!("\"--{}\" (prompt {})", option.trim(), i + 1);
            let field = match name.to_ascii_lowercase().as_str() {
                "n" => {
                    table.insert("negative".into(), toml::Value::String(value.to_owned()));
                    continue;
                }
                "w" => &schema::PROMPT_WIDTH,
                "h" => &schema::PROMPT_HEIGHT,
                "d" => &schema::PROMPT_SEED,
                "s" => &schema::PROMPT_STEPS,
                "l" => &schema::PROMPT_CFG,
                _ => {
                    let why =
                        "not available: lora-studio's samples take --n, --w, --h, --d, --s and --l";
                    parsed.problems.push((shown, why.into()));
                    continue;
                }
            };
            match option_value(field, value) {
                Ok(v) => {
                    table.insert(field_name(field).into(), v);
                }
                Err(why) => parsed.problems.push((shown, why)),
            }
        }
        parsed.prompts.push(table);
    }
    parsed
}

/// `sampling.prompts[].width` → `width`.
fn field_name(field: &Field) -> &'static str {
    field.key.rsplit('.').next().unwrap_or(field.key)
}

/// The option's value for `field`, checked against our range; sizes rounded down to a multiple of 8 as kohya
/// does.
fn option_value(field: &Field, text: &str) -> Result<toml::Value, String> {
    let bound = field.bound();
    if field.key == schema::PROMPT_CFG.key {
        let r = text
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite())
            .ok_or_else(|| format!("not a number: it must be {}", bound.describe()))?;
        if !bound.admits(Number::Real(r)) {
            return Err(format!("out of range: it must be {}", bound.describe()));
        }
        return Ok(toml::Value::Float(r));
    }
    let mut n = text
        .parse::<u64>()
        .map_err(|_| format!("not a whole number: it must be {}", bound.describe()))?;
    if field.key == schema::PROMPT_WIDTH.key || field.key == schema::PROMPT_HEIGHT.key {
        n -= n % 8;
    }
    match (bound.admits(Number::Whole(n)), i64::try_from(n)) {
        (true, Ok(v)) => Ok(toml::Value::Integer(v)),
        _ => Err(format!("out of range: it must be {}", bound.describe())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_prompts_with_kohya_defaults_and_options() {
        let p = parse(
            "# comment\n\nzk dog on a beach --n blurry, lowres --w 832 --h 1217 --s 25 --l 6.5 --d 42\n\
             zk cat --ss euler_a --w wide --s 500\n",
        );
        assert_eq!(p.prompts.len(), 2);
        let first = &p.prompts[0];
        assert_eq!(first["prompt"].as_str(), Some("zk dog on a beach"));
        assert_eq!(first["negative"].as_str(), Some("blurry, lowres"));
        assert_eq!(first["width"].as_integer(), Some(832));
        assert_eq!(
            first["height"].as_integer(),
            Some(1216),
            "rounded down to 8"
        );
        assert_eq!(first["steps"].as_integer(), Some(25));
        assert_eq!(first["cfg"].as_float(), Some(6.5));
        assert_eq!(first["seed"].as_integer(), Some(42));
        let second = &p.prompts[1];
        assert_eq!(second["prompt"].as_str(), Some("zk cat"));
        assert_eq!(second["width"].as_integer(), Some(512));
        assert_eq!(second["steps"].as_integer(), Some(30));
        assert!(second.get("seed").is_none());
        let shown: Vec<&str> = p.problems.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            shown,
            [
                "\"--ss euler_a\" (prompt 2)",
                "\"--w wide\" (prompt 2)",
                "\"--s 500\" (prompt 2)"
            ]
        );
        assert!(
            p.problems[2].1.contains("from 1 to 200"),
            "{:?}",
            p.problems
        );
    }
}
