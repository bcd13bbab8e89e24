//! Fault-injection switches: each one turns a guarantee off through the
//! environment (`KAPPA_TEST_…`, `KAPPA_EDGE_FAULT_…`), so that a fault test
//! can run its negative control and show that it would notice the
//! guarantee missing.
//!
//! They exist only in builds with the `fault-injection` feature, which the
//! tests' binaries enable (`kappa-tests` depends on the services with it) and
//! the product builds do not (`cargo build --release -p kappa-edge`, the
//! demo, the installer, the package, the container image). In any other
//! build a switch is never on: a variable left set on a gateway is logged
//! and ignored.

/// Whether the switch `var` is on: set (to anything but `0` or nothing) in a
/// build with fault injection. `what` says which guarantee it breaks, for
/// the warning logged when it is on.
pub fn on(var: &str, what: &str) -> bool {
    let set = std::env::var_os(var).is_some_and(|v| !v.is_empty() && v != "0");
    if !set {
        return false;
    }
    if cfg!(feature = "fault-injection") {
        tracing::warn!(switch = var, "Fault injection is on: {what}. Tests only; never on a real deployment.");
        true
    } else {
        tracing::warn!(switch = var, "This build has no fault injection: the variable is ignored.");
        false
    }
}
