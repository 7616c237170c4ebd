//! Everything the controller decides, as pure functions and data.
//!
//! This crate never does I/O: no network, no database, no file system, no clock and no
//! randomness. Time and new ids are arguments; the controller's shells (QUIC, HTTP, the
//! stores) read what a decision needs, call in here and apply what comes back in one
//! transaction. `tests/purity.rs` fails if the dependency closure gains an async
//! runtime, a database driver, a network stack or a random number generator.
//!
//! - [`ledger`]: double-entry postings and the check every store applies them through.
//! - [`billing`]: rating usage into invoice lines and postings.
//! - [`acceptance`]: whether a host's validation results let it sell.
//! - [`auction`]: English, Dutch and sealed auctions of capacity, as engines.
//! - [`exchange`]: the usage exchange between controllers: per-user minutes, the
//!   sequence that makes every row count once, usage per subscription period.
//! - [`history`]: pricing history: filters, chart buckets, and the range of winning
//!   prices shown beside a bid form.
//! - [`interrupt`]: which causes may interrupt which reservations (C6), notices and
//!   their grace, a provider's reclaim, and the defaults a provider's goal picks (C7).
//! - [`brokerage`]: subscriptions, margins over and under their limits, netting across
//!   users and clouds, offset costs, billing records, estimated contributions and the
//!   settlement of a bundle between its contributors (issue 18).
//! - [`catalog`]: the size category a host's measurements put it in, and the rank
//!   of listings a client is shown.
//! - [`reservations`]: the book of reserved hosts: a host held by one reservation
//!   at a time, release, interruption, expiry, who may control a host.
//! - [`resell`]: a provider's resell request, its well-formedness field by field,
//!   the preliminary criteria it must meet before its hosts are tested, and the
//!   acceptance criteria its hosts' validation evidence is judged by.
//! - [`listings`]: what an accepted host is offered as, a search's filters (an
//!   unknown one refused by name) and the order of its results.
//! - [`offers`]: what a client searching for capacity is shown: each listing's price
//!   in every mode it sells, how long it holds, and the order of the client's
//!   criterion.
//! - [`outbox`]: when a notice whose webhook delivery failed is tried again.
//! - [`pipeline`]: one resell request's way from submission to listed or rejected,
//!   as a state machine the shell stores as a row and rebuilds.
//! - [`quality`]: what a re-test does to a listing (kept, ranked lower, delisted,
//!   relisted) with the provider's advisory, and clients' ratings.
//! - [`quote`]: prices that are set, not bid: the immediate quote, fixed on-demand
//!   and long-term terms.
//! - [`stagger`]: contribution intervals, staggered contributions that hold an amount
//!   over a whole interval, their independent check, and a bundle's price (issue 18).
//! - [`spot`]: the spot market's uniform-price clearing per resource class.
//! - [`usage`]: what a batch of usage records adds: new, duplicate or refused, and
//!   each counter's delta.

pub mod acceptance;
pub mod auction;
pub mod billing;
pub mod brokerage;
pub mod catalog;
pub mod cohort;
pub mod exchange;
pub mod history;
pub mod interrupt;
pub mod ledger;
pub mod listings;
pub mod offers;
pub mod outbox;
pub mod pipeline;
pub mod pool;
pub mod provision;
pub mod quality;
pub mod quote;
pub mod records;
pub mod resell;
pub mod reservations;
pub mod spot;
pub mod stagger;
pub mod tender;
pub mod usage;

/// An input an engine of this crate refuses; it changed nothing. Each engine's module
/// doc lists its rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {message}")]
pub struct Refusal {
    /// The rule refused by, such as `sold_out` or `minimum`.
    pub rule: &'static str,
    /// Why, with the values.
    pub message: String,
}

pub(crate) fn refuse(rule: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        rule,
        message: message.into(),
    }
}
