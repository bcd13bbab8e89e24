//! TOML configuration files: parse, apply environment overrides, then check
//! everything the types cannot express, and report every problem at once
//! with its key path.
//!
//! Any key can be overridden from the environment without editing the file:
//! `{PREFIX}__SECTION__KEY=value` sets `section.key` (levels separated by
//! a double underscore, names case-insensitive), e.g.
//! `KAPPA_CLOUD__LOG__PARTITIONS=12` or `KAPPA_EDGE__FORWARD__CLOUD_URL=https://ingest.example`.
//! The value is read as a TOML value when it is one (`12`, `true`,
//! `"5s"`, `["a", "b"]`) and as a string otherwise (`5s`, `https://...`),
//! except in a table named `properties` (settings passed through to a
//! client library, such as librdkafka's), where every value is the string
//! as given: a password `12345` stays `"12345"`. A key with dots in its name
//! keeps them: `KAPPA_CLOUD__LOG__KAFKA__PROPERTIES__SASL.PASSWORD` sets
//! `sasl.password` in `[log.kafka.properties]` (set such a variable with
//! `env`, systemd or Kubernetes; a shell's `export` refuses the dot). Keys
//! inside arrays of tables (`[[views]]`) cannot be addressed this way.

use std::path::Path;

use serde::de::DeserializeOwned;

mod report;

/// Semantic checks of a parsed configuration.
pub trait Validate {
    /// Every problem, each starting with its key path (`log.partitions: ...`).
    fn problems(&self) -> Vec<String>;

    /// `Ok` when there is no problem.
    fn check(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() { Ok(()) } else { Err(ConfigError(problems)) }
    }
}

/// Parses and checks a configuration, reporting every problem at once,
/// each with its line and column.
pub fn from_toml<T: DeserializeOwned + Validate>(text: &str) -> Result<T, ConfigError> {
    parse("", text, None)
}

/// Reads, parses and checks a configuration file; problems name the file,
/// with the line and column where the file has them.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
    parse(&path.display().to_string(), &text, None)
}

/// Parses `text` (the file `file`'s, or none when empty), applies the
/// overrides among `env`'s variables of its prefix, deserializes and checks.
fn parse<T: DeserializeOwned + Validate>(
    file: &str,
    text: &str,
    env: Option<(&str, Vec<(String, String)>)>,
) -> Result<T, ConfigError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| report::position(file, text, s.start)).unwrap_or_else(|| file.to_string());
        let m = format!("not TOML: {}", e.message().trim());
        ConfigError(vec![if at.is_empty() { m } else { format!("{at}: {m}") }])
    })?;
    let (applied, lead) = match env {
        Some((prefix, vars)) => (apply_env(&mut table, prefix, vars)?, format!("{prefix}__")),
        None => (Vec::new(), String::new()),
    };
    let overrides: Vec<(String, String)> = applied
        .iter()
        .map(|name| (name[lead.len()..].split("__").map(str::to_lowercase).collect::<Vec<_>>().join("."), name.clone()))
        .collect();
    let src = report::Source { file, text, overrides: &overrides };
    let cfg: T = report::deserialize_all(&src, table).map_err(ConfigError)?;
    let note = |m: String| {
        let m = if applied.is_empty() { m } else { format!("{m} (environment overrides: {})", applied.join(", ")) };
        if file.is_empty() { m } else { format!("{file}: {m}") }
    };
    cfg.check().map_err(|e| ConfigError(e.0.into_iter().map(note).collect()))?;
    Ok(cfg)
}

/// Reads, parses and checks a configuration file after applying the
/// process's environment overrides named `{prefix}__...`; problems name the
/// file, and the overrides applied when there are any.
pub fn load_with_env<T: DeserializeOwned + Validate>(path: &Path, prefix: &str) -> Result<T, ConfigError> {
    load_with_vars(path, prefix, std::env::vars())
}

/// [`load_with_env`] with the variables given.
pub fn load_with_vars<T: DeserializeOwned + Validate>(
    path: &Path,
    prefix: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
    parse(&path.display().to_string(), &text, Some((prefix, vars.into_iter().collect())))
}

/// Applies every `{prefix}__A__B=value` in `vars` to `table` as key `a.b`;
/// returns the names of the variables applied, sorted.
pub fn apply_env(
    table: &mut toml::Table,
    prefix: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let lead = format!("{prefix}__");
    let mut applied: Vec<(String, String)> =
        vars.into_iter().filter(|(name, _)| name.starts_with(&lead) && name.len() > lead.len()).collect();
    applied.sort();
    let mut problems = Vec::new();
    for (name, raw) in &applied {
        let path: Vec<String> = name[lead.len()..].split("__").map(str::to_lowercase).collect();
        if path.iter().any(String::is_empty) {
            problems.push(format!("{name}: empty key between double underscores"));
            continue;
        }
        let pass_through = path.len() >= 2 && path[path.len() - 2] == "properties";
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|_| !pass_through)
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        if let Err(depth) = set_path(table, &path, value) {
            problems.push(format!("{name}: {} is not a table", path[..=depth].join(".")));
        }
    }
    if problems.is_empty() {
        Ok(applied.into_iter().map(|(name, _)| name).collect())
    } else {
        Err(ConfigError(problems))
    }
}

/// Sets `path` in `table`, making tables on the way; on a non-table in the
/// way, its depth.
fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), usize> {
    match path {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            match table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
                toml::Value::Table(t) => set_path(t, rest, value).map_err(|d| d + 1),
                _ => Err(0),
            }
        }
    }
}

/// Every problem found in a configuration, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// A size in bytes, written in a config file as an integer or with a unit:
/// `"512MiB"`, `"2GiB"`, `"64kB"` (binary `KiB`/`MiB`/`GiB`/`TiB`, decimal
/// `kB`/`MB`/`GB`/`TB`, or `B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"512MiB"`-style text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size like \"512MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" => 1000,
            "MB" => 1000_u64.pow(2),
            "GB" => 1000_u64.pow(3),
            "TB" => 1000_u64.pow(4),
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => return Err(format!("unknown size unit {other:?} in {text:?} (use B, kB, MB, GB, KiB, MiB, GiB)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let units = [(1u64 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match units.iter().find(|(u, _)| self.0 >= *u && self.0.is_multiple_of(*u)) {
            Some((u, name)) => write!(f, "{}{name}", self.0 / u),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// What "committed" means for a SQLite log (the edge's and the embedded
/// event log): `durability = "full"` or `"normal"` in their `[log]` sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced before it is acknowledged;
    /// it survives a power cut.
    Full,
    /// `synchronous=NORMAL`: survives a process crash; the last commits may
    /// be lost in a power cut (tests/e2e/power_cut.rs shows both).
    Normal,
}

impl Durability {
    /// The value of SQLite's `synchronous` pragma.
    pub fn synchronous(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// Whether the process can keep its data in `dir` (`key` names it in the
/// problem): an existing directory it can write into, or one it can create
/// because the nearest existing ancestor is a directory it can write into.
/// Creates nothing but a probe file, removed at once.
pub fn writable_dir(key: &str, dir: &Path) -> Result<(), String> {
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) if at == dir => return Err(format!("{key}: {} is a file, not a directory", dir.display())),
            Ok(_) => {
                return Err(format!("{key}: {} cannot be created: {} is a file", dir.display(), at.display()));
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                match at.parent() {
                    Some(parent) if parent.as_os_str().is_empty() => at = Path::new("."),
                    Some(parent) => at = parent,
                    None => return Err(format!("{key}: {} has no existing ancestor", dir.display())),
                }
            }
            Err(e) => return Err(format!("{key}: cannot look at {}: {e}", at.display())),
        }
    }
    let probe = at.join(format!(".kappa-write-check-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if at == dir => Err(format!("{key}: cannot write into {}: {e}", dir.display())),
        Err(e) => Err(format!("{key}: {} cannot be created: cannot write into {}: {e}", dir.display(), at.display())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_like_humans_write_them() {
        for (text, bytes) in [("512MiB", 512 << 20), ("2 GiB", 2 << 30), ("64kB", 64_000), ("100", 100), ("7B", 7)] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        assert!(ByteSize::parse("12 parsecs").unwrap_err().contains("unknown size unit"));
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999TiB").unwrap_err().contains("too large"));
        assert_eq!(ByteSize(3 << 20).to_string(), "3MiB");
    }

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        a: u32,
    }

    impl Validate for Cfg {
        fn problems(&self) -> Vec<String> {
            (self.a > 9).then(|| "a: must be at most 9".to_string()).into_iter().collect()
        }
    }

    #[test]
    fn a_missing_file_names_itself() {
        let err = load::<Cfg>(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(err.0[0].starts_with("cannot read /nonexistent/x.toml"), "{err}");
    }

    #[test]
    fn problems_in_a_file_are_prefixed_with_its_path() {
        let dir = std::env::temp_dir().join(format!("kappa-runtime-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "a = 10").unwrap();
        let err = load::<Cfg>(&path).unwrap_err();
        assert_eq!(err.0, [format!("{}: a: must be at most 9", path.display())]);
        std::fs::write(&path, "b = 1").unwrap();
        let err = load::<Cfg>(&path).unwrap_err();
        let p = path.display();
        assert_eq!(
            err.0,
            [format!("{p}:1:1: b: unknown key `b`; did you mean `a`?"), format!("{p}:1:1: missing field `a`")]
        );
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn environment_variables_override_nested_keys_with_typed_values() {
        let mut t: toml::Table = toml::from_str("top = 1\n[log]\npartitions = 8\n[http]\nlisten = \"a\"\n").unwrap();
        let applied = apply_env(
            &mut t,
            "KAPPA_X",
            vars(&[
                ("KAPPA_X__LOG__PARTITIONS", "12"),
                ("KAPPA_X__HTTP__LISTEN", "0.0.0.0:8080"),
                ("KAPPA_X__LOG__KAFKA__BROKERS", "k:9092"),
                ("KAPPA_X__FLAG", "true"),
                ("KAPPA_X_NOT_A_KEY", "1"),
                ("OTHER__LOG__PARTITIONS", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(
            applied,
            ["KAPPA_X__FLAG", "KAPPA_X__HTTP__LISTEN", "KAPPA_X__LOG__KAFKA__BROKERS", "KAPPA_X__LOG__PARTITIONS"]
        );
        let expect: toml::Table = toml::from_str(
            "top = 1\nflag = true\n[log]\npartitions = 12\n[log.kafka]\nbrokers = \"k:9092\"\n[http]\nlisten = \"0.0.0.0:8080\"\n",
        )
        .unwrap();
        assert_eq!(t, expect);
        let mut props = toml::Table::new();
        apply_env(
            &mut props,
            "KAPPA_X",
            vars(&[("KAPPA_X__LOG__KAFKA__PROPERTIES__SASL.PASSWORD", "12345"), ("KAPPA_X__LOG__PROPS", "12345")]),
        )
        .unwrap();
        let expect: toml::Table =
            toml::from_str("[log]\nprops = 12345\n[log.kafka.properties]\n\"sasl.password\" = \"12345\"\n").unwrap();
        assert_eq!(props, expect, "pass-through properties are strings as given, with their dots");
        let err =
            apply_env(&mut t, "KAPPA_X", vars(&[("KAPPA_X__TOP__A", "1"), ("KAPPA_X__LOG____A", "1")])).unwrap_err();
        assert_eq!(
            err.0,
            ["KAPPA_X__LOG____A: empty key between double underscores", "KAPPA_X__TOP__A: top is not a table"]
        );
    }

    #[test]
    fn an_override_is_checked_like_the_file_and_named_in_the_problem() {
        let dir = std::env::temp_dir().join(format!("kappa-runtime-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "a = 1").unwrap();
        let cfg: Cfg = load_with_vars(&path, "K", vars(&[("K__A", "7")])).unwrap();
        assert_eq!(cfg.a, 7);
        let err = load_with_vars::<Cfg>(&path, "K", vars(&[("K__A", "70")])).unwrap_err();
        assert_eq!(err.0, [format!("{}: a: must be at most 9 (environment overrides: K__A)", path.display())]);
        let err = load_with_vars::<Cfg>(&path, "K", vars(&[("K__B", "1")])).unwrap_err().to_string();
        assert!(err.contains("K__B (environment): b: unknown key `b`"), "{err}");
    }

    #[test]
    fn a_data_directory_must_be_writable_or_creatable() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(writable_dir("data_dir", tmp.path()), Ok(()));
        assert_eq!(writable_dir("data_dir", &tmp.path().join("a/b/c")), Ok(()));
        assert!(!tmp.path().join("a").exists(), "the check creates nothing");
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = writable_dir("data_dir", &file.join("data")).unwrap_err();
        assert!(err.starts_with("data_dir: ") && err.contains("is a file"), "{err}");
        assert!(writable_dir("data_dir", &file).unwrap_err().contains("not a directory"));
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "no probe left behind");
    }
}
