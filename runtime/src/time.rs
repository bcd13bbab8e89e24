//! Wall-clock time as the services store it: Unix milliseconds.

/// The wall clock in Unix milliseconds (0 before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A time given on a command line or in a query: RFC 3339
/// (`2026-01-01T00:00:00Z`) or Unix milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
        .map_err(|_| format!("{s:?} is neither RFC 3339 nor Unix milliseconds"))
}

/// Unix milliseconds as RFC 3339 in UTC, to the second unless there are
/// milliseconds (`2026-01-01T00:00:00Z`, `2026-01-01T00:00:00.250Z`);
/// before 1970, the number itself.
pub fn format_time(ms: i64) -> String {
    let Ok(unsigned) = u64::try_from(ms) else { return ms.to_string() };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unsigned);
    if ms % 1000 == 0 {
        humantime::format_rfc3339_seconds(at).to_string()
    } else {
        humantime::format_rfc3339_millis(at).to_string()
    }
}

/// A span of milliseconds as a person reads it: `250ms`, `1m 30s`, `2h 5m`
/// (to the second past a minute).
pub fn format_span(ms: i64) -> String {
    let abs = ms.unsigned_abs();
    let shown = if abs >= 60_000 { abs / 1000 * 1000 } else { abs };
    let sign = if ms < 0 { "-" } else { "" };
    format!("{sign}{}", humantime::format_duration(std::time::Duration::from_millis(shown)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc_3339_or_unix_milliseconds() {
        assert_eq!(parse_time("1767225600000"), Ok(1_767_225_600_000));
        assert_eq!(parse_time("2026-01-01T00:00:00Z"), Ok(1_767_225_600_000));
        assert!(parse_time("yesterday").is_err());
        assert!(now_ms() > 1_767_225_600_000);
    }

    #[test]
    fn times_and_spans_are_written_for_people() {
        assert_eq!(format_time(1_767_225_600_000), "2026-01-01T00:00:00Z");
        assert_eq!(format_time(1_767_225_600_250), "2026-01-01T00:00:00.250Z");
        assert_eq!(parse_time(&format_time(1_796_593_167_189)), Ok(1_796_593_167_189));
        assert_eq!(format_time(-5), "-5");
        assert_eq!(format_span(250), "250ms");
        assert_eq!(format_span(90_500), "1m 30s");
        assert_eq!(format_span(7_500_000), "2h 5m");
    }
}
