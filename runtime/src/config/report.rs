//! Every problem of a config file at once, each with where it is: the
//! file's line and column, or the environment variable that set the value;
//! a "did you mean" for an unknown key, and an example for a malformed
//! duration.
//!
//! The types stop at their first problem (serde does), so the file is read
//! again with the offending line blanked out, until it reads or a problem
//! cannot be stepped over (a missing key, or a syntax error). Blanking keeps
//! the line count, so every position stays the file's.

use serde::de::DeserializeOwned;

/// At most this many problems of one file are reported.
const MAX_PROBLEMS: usize = 20;

/// What a config's text is and where it came from.
pub(super) struct Source<'a> {
    /// The file's name as problems show it; empty for text with no file.
    pub file: &'a str,
    /// The file's text as written.
    pub text: &'a str,
    /// Keys the environment set (`log.partitions`), with the variable.
    pub overrides: &'a [(String, String)],
}

/// Deserializes `table` (the file's, with the environment's overrides
/// applied), or reports every problem it finds.
pub(super) fn deserialize_all<T: DeserializeOwned>(src: &Source<'_>, table: toml::Table) -> Result<T, Vec<String>> {
    // Positions are the file's while the text is the file's; with
    // overrides, the text is the merged table's, and a problem's key is
    // looked up in the file.
    let mut doc = if src.overrides.is_empty() {
        src.text.to_string()
    } else {
        toml::to_string(&table).map_err(|e| vec![at_file(src.file, format!("cannot merge the overrides: {e}"))])?
    };
    // Each problem with where it sorts: its line in the file (a variable's after).
    let mut problems: Vec<(usize, String)> = Vec::new();
    while problems.len() < MAX_PROBLEMS {
        let e = match toml::from_str::<T>(&doc) {
            Ok(cfg) if problems.is_empty() => return Ok(cfg),
            Ok(_) => break,
            Err(e) => e,
        };
        let message = explain(e.message());
        let Some(span) = e.span() else {
            problems.push((usize::MAX, at_file(src.file, message)));
            break;
        };
        let mut order = usize::MAX;
        let key = key_at(&doc, span.start);
        let place = match src.overrides.iter().find(|(k, _)| *k == key) {
            Some((_, var)) => format!("{var} (environment)"),
            None if src.overrides.is_empty() => {
                order = line_of(&doc, span.start);
                position(src.file, &doc, span.start)
            }
            None => match locate(src.text, &key) {
                Some(offset) => {
                    order = line_of(src.text, offset);
                    position(src.file, src.text, offset)
                }
                None => src.file.to_string(),
            },
        };
        let what = if key.is_empty() { message } else { format!("{key}: {message}") };
        let problem = if place.is_empty() { what } else { format!("{place}: {what}") };
        if problems.iter().any(|(_, p)| *p == problem) {
            break; // stepping over it did not help
        }
        problems.push((order, problem));
        if span.start == 0 && span.end >= doc.trim_end().len() {
            break; // the whole file: a missing key at the top
        }
        let (first, last) = (line_of(&doc, span.start), line_of(&doc, span.end.saturating_sub(1).max(span.start)));
        let header = doc.lines().nth(first).is_some_and(|l| l.trim_start().starts_with('['));
        if header || last - first > 8 {
            break; // a missing key or a whole table: nothing to step over
        }
        let blanked: Vec<&str> =
            doc.lines().enumerate().map(|(i, l)| if (first..=last).contains(&i) { "" } else { l }).collect();
        let next = blanked.join("\n");
        if toml::from_str::<toml::Table>(&next).is_err() {
            break; // stepping over it broke the syntax: stop here
        }
        doc = next;
    }
    problems.sort_by_key(|(order, _)| *order);
    Err(problems.into_iter().map(|(_, p)| p).collect())
}

fn at_file(file: &str, m: String) -> String {
    if file.is_empty() { m } else { format!("{file}: {m}") }
}

/// `file:line:column` (1-based), or `line L, column C` with no file.
pub(super) fn position(file: &str, text: &str, offset: usize) -> String {
    let line = line_of(text, offset);
    let start = text[..offset.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let column = text[start..offset.min(text.len())].chars().count() + 1;
    if file.is_empty() {
        format!("line {}, column {column}", line + 1)
    } else {
        format!("{file}:{}:{column}", line + 1)
    }
}

/// The 0-based line holding `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count()
}

/// The dotted key at `offset`: the table header above it, then the key
/// the line sets (`log.durability`); the header alone on a header line.
fn key_at(text: &str, offset: usize) -> String {
    let line = line_of(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let header = lines[..(line + 1).min(lines.len())].iter().rev().find_map(|l| table_name(l)).unwrap_or_default();
    let own = lines.get(line).and_then(|l| l.split_once('=')).map(|(k, _)| unquote(k.trim())).unwrap_or_default();
    match (header.is_empty(), own.is_empty()) {
        (_, true) => header,
        (true, false) => own,
        (false, false) => format!("{header}.{own}"),
    }
}

/// `log.kafka` for a `[log.kafka]` (or `[[views]]`) line.
fn table_name(line: &str) -> Option<String> {
    let t = line.trim();
    let inner = t
        .strip_prefix("[[")
        .and_then(|r| r.split("]]").next())
        .or_else(|| t.strip_prefix('[').and_then(|r| r.split(']').next()))?;
    Some(inner.split('.').map(|p| unquote(p.trim())).collect::<Vec<_>>().join("."))
}

fn unquote(s: &str) -> String {
    s.trim_matches('"').trim_matches('\'').to_string()
}

/// Where the file sets `key`: the offset of its line's key.
fn locate(text: &str, key: &str) -> Option<usize> {
    let mut header = String::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Some(t) = table_name(line) {
            header = t;
        } else if let Some((k, _)) = line.split_once('=') {
            let k = unquote(k.trim());
            let full = if header.is_empty() { k } else { format!("{header}.{k}") };
            if full == key {
                return Some(offset + (line.len() - line.trim_start().len()));
            }
        }
        offset += line.len();
    }
    None
}

/// The deserializer's message, said for a person: an unknown key with the
/// nearest known one, a bad duration with examples.
fn explain(message: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let words: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
        if let Some((unknown, known)) = words.split_first() {
            return match known.iter().min_by_key(|k| distance(unknown, k)) {
                Some(near) if distance(unknown, near) <= (unknown.len() / 3).max(2) => {
                    format!("unknown key `{unknown}`; did you mean `{near}`?")
                }
                Some(_) => format!("unknown key `{unknown}` (the keys here: {})", known.join(", ")),
                None => format!("unknown key `{unknown}` (this table takes no keys)"),
            };
        }
    }
    if message.contains("duration") || message.contains("time unit") {
        return format!("{message} (a duration is written like \"500ms\", \"5s\", \"10m\" or \"1h 30m\")");
    }
    message.to_string()
}

/// Levenshtein distance between two keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        name: String,
        #[serde(default)]
        log: Log,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Log {
        #[serde(default)]
        durability: String,
        #[serde(default)]
        partitions: u32,
        #[serde(default, with = "humantime_serde")]
        linger: Option<std::time::Duration>,
    }

    fn problems(text: &str, overrides: &[(String, String)]) -> Vec<String> {
        let mut table: toml::Table = toml::from_str(text).unwrap();
        for (key, _) in overrides {
            let (section, k) = key.split_once('.').unwrap();
            table.get_mut(section).unwrap().as_table_mut().unwrap().insert(k.into(), toml::Value::from(true));
        }
        let src = Source { file: "c.toml", text, overrides };
        deserialize_all::<Cfg>(&src, table).unwrap_err()
    }

    #[test]
    fn every_problem_of_a_file_is_reported_at_once_with_its_line_and_column() {
        let text = "name = \"x\"\n[log]\ndurabilty = \"full\"\npartitions = \"many\"\nlinger = \"5 parsecs\"\n";
        let p = problems(text, &[]);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert_eq!(p[0], "c.toml:3:1: log.durabilty: unknown key `durabilty`; did you mean `durability`?");
        assert!(p[1].starts_with("c.toml:4:14: log.partitions: "), "{}", p[1]);
        assert!(p[2].starts_with("c.toml:5:10: log.linger: ") && p[2].contains("\"5s\""), "{}", p[2]);
    }

    #[test]
    fn a_key_far_from_every_known_one_lists_them_and_a_missing_one_stops_the_search() {
        let p = problems("name = \"x\"\n[log]\nzzzzzzzzzz = 1\n", &[]);
        assert_eq!(
            p,
            ["c.toml:3:1: log.zzzzzzzzzz: unknown key `zzzzzzzzzz` (the keys here: durability, partitions, linger)"]
        );
        let p = problems("[log]\npartitions = 1\n", &[]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("name"), "{p:?}");
    }

    #[test]
    fn a_problem_an_override_made_names_the_variable() {
        let p = problems(
            "name = \"x\"\n[log]\ndurability = \"full\"\n",
            &[("log.partitions".into(), "K__LOG__PARTITIONS".into())],
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("K__LOG__PARTITIONS (environment): log.partitions: "), "{p:?}");
    }

    #[test]
    fn keys_are_read_under_their_table() {
        let text = "a = 1\n[log.kafka]\n\"b\" = 2\n[[views]]\nc = 3\n";
        assert_eq!(key_at(text, 0), "a");
        assert_eq!(key_at(text, text.find("\"b\"").unwrap()), "log.kafka.b");
        assert_eq!(key_at(text, text.find("c =").unwrap()), "views.c");
        assert_eq!(locate(text, "log.kafka.b"), text.find("\"b\""));
        assert_eq!(distance("durabilty", "durability"), 1);
    }
}
