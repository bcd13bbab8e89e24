//! TOML configuration files: parse, then check everything the types cannot
//! express, and report every problem at once with its key path.

use std::path::Path;

use serde::de::DeserializeOwned;

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

/// Parses and checks a configuration.
pub fn from_toml<T: DeserializeOwned + Validate>(text: &str) -> Result<T, ConfigError> {
    let cfg: T = toml::from_str(text).map_err(|e| ConfigError(vec![e.to_string()]))?;
    cfg.check()?;
    Ok(cfg)
}

/// Reads, parses and checks a configuration file; problems name the file.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
    from_toml(&text).map_err(|e| ConfigError(e.0.into_iter().map(|m| format!("{}: {m}", path.display())).collect()))
}

/// Every problem found in a configuration, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

#[cfg(test)]
mod tests {
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
        assert!(load::<Cfg>(&path).unwrap_err().to_string().contains("unknown field `b`"));
    }
}
