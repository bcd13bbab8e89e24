//! End-to-end tests that need the machine to themselves. They run a
//! simulated fleet many times faster than real time and judge it partly by
//! the wall clock (arrival quiet, gaps between a gateway's batches, commit
//! deadlines), so another test's load on a 2-core machine turns into wrong
//! answers: in CI, beside the browser and webhook tests, the scoring test saw
//! silence recall fall to 0.03. Cargo runs test binaries one after another,
//! and every test here holds [`alone`] for its whole run, so each runs with
//! no other test beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod alert_scoring;
mod fleet_scale;

static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for a whole test: the tests of this binary run one at a time.
pub async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    ALONE.lock().await
}
