//! `GET /metrics`, parsed: the Prometheus text format (version 0.0.4).
//!
//! A [`Scrape`] maps each series (a name and its labels) to its value and
//! remembers each family's `# TYPE`. The parser is strict: a line it cannot
//! read fails the test, so the format itself is under test too.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Series → value; a series is its name and its labels sorted by name.
    samples: HashMap<(String, BTreeMap<String, String>), f64>,
    /// Family name → `counter`, `gauge`, `histogram`, …
    types: HashMap<String, String>,
    text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape {
            text: text.to_owned(),
            ..Scrape::default()
        };
        for (number, line) in text.lines().enumerate() {
            let fail = |why: &str| -> ! {
                panic!("/metrics line {}: {why}: {line:?}\n{text}", number + 1)
            };
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        fail("a TYPE line needs a name and a type")
                    };
                    scrape.types.insert(name.to_owned(), kind.trim().to_owned());
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| fail("no value"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                value => value
                    .parse()
                    .unwrap_or_else(|_| fail("the value is not a number")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| fail("unterminated labels"));
                    (name, parse_labels(body).unwrap_or_else(|why| fail(&why)))
                }
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            {
                fail("bad metric name");
            }
            if scrape
                .samples
                .insert((name.to_owned(), labels), value)
                .is_some()
            {
                fail("the same series twice");
            }
        }
        scrape
    }

    /// The value of the series `name{labels}` (exactly these labels).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    /// Like [`Scrape::get`], 0 when the series is absent (a counter that
    /// never moved may not be exported yet).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The `# TYPE` of a family.
    pub fn type_of(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }

    /// Every series of `name`, with its labels.
    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|((series, _), _)| series == name)
            .map(|((_, labels), value)| (labels.clone(), *value))
            .collect()
    }

    /// The text as scraped, for failure messages.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// `a="x",b="y\"z"` → {a: x, b: y"z}.
fn parse_labels(body: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return if labels.is_empty() {
                Ok(labels)
            } else {
                Err("empty label name".into())
            };
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            return Err(format!("label {key} has no quoted value"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => return Err(format!("bad escape \\{other:?}")),
                },
                Some(c) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        }
        if labels.insert(key.clone(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        match chars.next() {
            None => return Ok(labels),
            Some(',') => continue,
            Some(c) => return Err(format!("unexpected {c:?} after a label")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_format() {
        let scrape = Scrape::parse(
            "# HELP a_total Things.\n# TYPE a_total counter\na_total{type=\"x.y\",outcome=\"ok\"} 3\n\
             a_total{type=\"q\\\"\"} 1\nb 2.5\nh_bucket{le=\"+Inf\"} 4\n",
        );
        assert_eq!(
            scrape.get("a_total", &[("outcome", "ok"), ("type", "x.y")]),
            Some(3.0)
        );
        assert_eq!(scrape.get("a_total", &[("type", "q\"")]), Some(1.0));
        assert_eq!(scrape.get("b", &[]), Some(2.5));
        assert_eq!(scrape.get("h_bucket", &[("le", "+Inf")]), Some(4.0));
        assert_eq!(scrape.type_of("a_total"), Some("counter"));
        assert_eq!(scrape.value("missing", &[]), 0.0);
    }
}
