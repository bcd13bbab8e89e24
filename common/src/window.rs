//! Event-time window arithmetic shared by edge pre-aggregation and the cloud.

/// Start of the tumbling window of `size_ms` containing `ts_ms` (floor, also for negative times).
pub fn tumbling_start(ts_ms: i64, size_ms: i64) -> i64 {
    ts_ms - ts_ms.rem_euclid(size_ms.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_floor_toward_minus_infinity() {
        assert_eq!(tumbling_start(60_000, 60_000), 60_000);
        assert_eq!(tumbling_start(119_999, 60_000), 60_000);
        assert_eq!(tumbling_start(-1, 60_000), -60_000);
    }
}
