//! Process plumbing shared by the Surplus binaries, kept in `surplus-runtime` so
//! that the controller can use it without the agent; re-exported for the agent's
//! call sites.

pub use surplus_runtime::{end_quietly_on_closed_pipe, exit_code, init_logs, shutdown_signal};
