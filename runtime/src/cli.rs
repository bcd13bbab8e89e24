//! What the three binaries share on the command line: one table of exit
//! codes, and a quiet end when the reader of their output goes away.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success; for a question (`views compare`, `views verify`, `log check`, `archive verify`), "yes" |
//! | 1 | the command ran and the answer is "no": versions differ, the archive or the log is damaged |
//! | 2 | the command could not run: a bad config or arguments, a store that cannot be reached, I/O |
//! | 3 | `kappa-sim` only: readings were still unacknowledged when it stopped |
//!
//! A process killed by a signal exits as the shell reports it (128 + the
//! signal): 141 when its output pipe closed (`kappa-cloud views dump | head`).

/// Success, or "yes".
pub const EXIT_OK: u8 = 0;
/// The command ran and the answer is "no".
pub const EXIT_NO: u8 = 1;
/// The command could not run.
pub const EXIT_FAILED: u8 = 2;
/// `kappa-sim`: readings were still unacknowledged at the end of the run.
pub const EXIT_UNDELIVERED: u8 = 3;

/// Test switch (`fault-injection` builds only): [`end_quietly_on_closed_pipe`]
/// does nothing (the negative control of the closed-pipe test).
pub const FAULT_IGNORE_CLOSED_PIPE: &str = "KAPPA_TEST_IGNORE_CLOSED_PIPE";

/// The `--log-format` values.
pub const LOG_FORMATS: [&str; 2] = ["text", "json"];

/// Lets a closed output pipe end the process quietly, as it ends `cat` or
/// `grep` (`kappa-edge log export | head`). Rust ignores SIGPIPE, so every
/// write to a closed pipe fails and `println!` panics; this restores the
/// default action. For the commands that print and end, never for the
/// servers: they write to sockets, whose peers go away as a matter of course.
#[allow(unsafe_code)]
pub fn end_quietly_on_closed_pipe() {
    if crate::fault::on(FAULT_IGNORE_CLOSED_PIPE, "a closed output pipe makes the printing commands fail loudly") {
        return;
    }
    // SAFETY: setting a signal's action to its default at start-up, before
    // any thread that could be handling it exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
