//! The double-entry ledger, as plain functions over plain data.
//!
//! Amounts are integers in the minor unit of a named currency (cents of `EUR`, or a
//! pool's own unit later). A posting is a set of entries that sums to zero in every
//! currency; it carries an idempotency key, and applying the same posting twice
//! changes nothing, while reusing a key for a different posting is refused. Some
//! accounts may not go below zero (providers, the marketplace, prepaid clients); a
//! posting that would take one there is refused whole.
//!
//! Account names say what they are: `client:<account>`, `provider:<account>`,
//! `marketplace` (commission revenue) and `external` (the world outside: money paid in
//! and paid out). The storage layer runs [`check`] inside its transaction.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The marketplace's commission revenue account.
pub const MARKETPLACE: &str = "marketplace";
/// Money entering or leaving the system.
pub const EXTERNAL: &str = "external";

/// A client's account.
pub fn client(account: &str) -> String {
    format!("client:{account}")
}

/// A provider's account.
pub fn provider(account: &str) -> String {
    format!("provider:{account}")
}

/// A pool owner's account.
pub fn pool(account: &str) -> String {
    format!("pool:{account}")
}

/// A client's held funds: what its bids that may win hold (A hold account never goes
/// below zero: it holds only what was put in).
pub fn held(account: &str) -> String {
    format!("hold:{account}")
}

/// The posting that holds `amount` of `client`'s funds under `key` (a bid that may
/// win): from its account to its held funds. For a prepaid client the ledger's rule
/// refuses it without the funds, so a bid it cannot pay is refused when it is made.
pub fn hold_posting(key: &str, client_account: &str, currency: &str, amount: i64) -> Posting {
    Posting {
        key: format!("hold:{key}"),
        kind: "hold".into(),
        memo: format!("funds held for {key}"),
        entries: vec![
            Entry {
                account: client(client_account),
                currency: currency.into(),
                amount: -amount,
            },
            Entry {
                account: held(client_account),
                currency: currency.into(),
                amount,
            },
        ],
    }
}

/// The posting that gives back what [`hold_posting`] held under `key` (the bid lost,
/// was cancelled, or the auction closed and its charges are billed as used).
pub fn release_posting(key: &str, client_account: &str, currency: &str, amount: i64) -> Posting {
    let mut p = hold_posting(key, client_account, currency, amount.saturating_neg());
    p.key = format!("hold:{key}:release");
    p.kind = "release".into();
    p.memo = format!("funds held for {key} given back");
    p
}

/// Whether an account may go below zero unless told otherwise: clients are billed
/// after use (postpaid) and `external` is the outside world; providers and the
/// marketplace can only hold what they earned.
pub fn default_allows_negative(account: &str) -> bool {
    account == EXTERNAL || account.starts_with("client:")
}

/// Checks an account name: `external`, `marketplace`, or `client:`/`provider:`/`pool:`/
/// `hold:` followed by 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn validate_account(name: &str) -> Result<(), String> {
    if name == EXTERNAL || name == MARKETPLACE {
        return Ok(());
    }
    let rest = ["client:", "provider:", "pool:", "hold:"]
        .iter()
        .find_map(|p| name.strip_prefix(p));
    match rest {
        Some(r)
            if !r.is_empty()
                && r.len() <= 64
                && r.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "account {name:?}: must be external, marketplace, or client:/provider:/pool:/hold: followed by 1 to 64 of A-Z a-z 0-9 _ . -"
        )),
    }
}

/// Checks a currency code: 1 to 16 of `[A-Z0-9_]` (`EUR`, `USD`, a pool's `GPUH`).
pub fn validate_currency(code: &str) -> Result<(), String> {
    if !code.is_empty()
        && code.len() <= 16
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "currency {code:?}: must be 1 to 16 of A-Z, 0-9, '_'"
        ))
    }
}

/// One line of a posting: `amount` added to `account`'s balance in `currency`
/// (negative takes away).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Entry {
    /// Account name.
    pub account: String,
    /// Currency code.
    pub currency: String,
    /// Minor units.
    pub amount: i64,
}

/// A balanced set of entries with an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Posting {
    /// Idempotency key: the same posting under the same key is applied once.
    pub key: String,
    /// `payment`, `payout`, `usage`, `upfront`, ...
    pub kind: String,
    /// For people.
    pub memo: String,
    /// The entries.
    pub entries: Vec<Entry>,
}

impl Posting {
    /// A digest of what the posting does (not its memo), to recognise a key reused
    /// for another posting.
    pub fn digest(&self) -> String {
        let mut entries: Vec<_> = self
            .entries
            .iter()
            .map(|e| format!("{}|{}|{}", e.account, e.currency, e.amount))
            .collect();
        entries.sort();
        let text = format!("{}\n{}", self.kind, entries.join("\n"));
        sha256_hex(text.as_bytes())
    }
}

/// The lower-case hex SHA-256 of `bytes` (posting digests and invoice ids).
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a posting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The posting is malformed.
    #[error("invalid posting: {0}")]
    Invalid(String),
    /// The entries do not sum to zero in a currency.
    #[error("posting {key} does not balance in {currency}: entries sum to {sum}")]
    Unbalanced {
        /// The key.
        key: String,
        /// The currency.
        currency: String,
        /// What they sum to.
        sum: i128,
    },
    /// An account that may not go below zero would.
    #[error("{account} has {balance} {currency}; posting {key} needs {needed}")]
    Insufficient {
        /// The key.
        key: String,
        /// The account.
        account: String,
        /// The currency.
        currency: String,
        /// Its balance.
        balance: i64,
        /// What the posting takes from it.
        needed: i64,
    },
    /// The key was used for another posting.
    #[error("key {0} was already used for a different posting")]
    KeyReused(String),
    /// A balance would overflow.
    #[error("balance of {0} would overflow")]
    Overflow(String),
}

/// What [`check`] computed: the new balance of every (account, currency) touched.
pub type NewBalances = Vec<(String, String, i64)>;

/// Checks `posting` against current balances: well-formed, balanced per currency, no
/// protected account below zero. Returns the new balances to store.
pub fn check(
    posting: &Posting,
    balance: impl Fn(&str, &str) -> i64,
    allows_negative: impl Fn(&str) -> bool,
) -> Result<NewBalances, LedgerError> {
    if posting.key.is_empty() || posting.key.len() > 200 {
        return Err(LedgerError::Invalid("key: 1 to 200 characters".into()));
    }
    if posting.entries.is_empty() {
        return Err(LedgerError::Invalid("a posting needs entries".into()));
    }
    let mut sums: BTreeMap<&str, i128> = BTreeMap::new();
    let mut moves: BTreeMap<(&str, &str), i128> = BTreeMap::new();
    for e in &posting.entries {
        validate_account(&e.account).map_err(LedgerError::Invalid)?;
        validate_currency(&e.currency).map_err(LedgerError::Invalid)?;
        *sums.entry(&e.currency).or_default() += i128::from(e.amount);
        *moves.entry((&e.account, &e.currency)).or_default() += i128::from(e.amount);
    }
    for (currency, sum) in sums {
        if sum != 0 {
            return Err(LedgerError::Unbalanced {
                key: posting.key.clone(),
                currency: currency.to_owned(),
                sum,
            });
        }
    }
    let mut out = Vec::with_capacity(moves.len());
    for ((account, currency), delta) in moves {
        let old = balance(account, currency);
        let new = i64::try_from(i128::from(old) + delta)
            .map_err(|_| LedgerError::Overflow(account.to_owned()))?;
        if new < 0 && delta < 0 && !allows_negative(account) {
            return Err(LedgerError::Insufficient {
                key: posting.key.clone(),
                account: account.to_owned(),
                currency: currency.to_owned(),
                balance: old,
                needed: i64::try_from(-delta).unwrap_or(i64::MAX),
            });
        }
        out.push((account.to_owned(), currency.to_owned(), new));
    }
    Ok(out)
}

/// What a store does with a posting, given what it holds: [`decide`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Apply it: store the posting, its entries and these new balances.
    Post(NewBalances),
    /// The same posting was applied before under its key: change nothing.
    Duplicate,
}

/// The one rule every ledger applies a posting by, the in-memory [`Ledger`] and each
/// store alike: a key already applied with the same digest is a duplicate, with
/// another digest a [`LedgerError::KeyReused`]; otherwise [`check`] decides.
/// `stored_digest` is the digest stored under the posting's key, if any.
pub fn decide(
    posting: &Posting,
    stored_digest: Option<&str>,
    balance: impl Fn(&str, &str) -> i64,
    allows_negative: impl Fn(&str) -> bool,
) -> Result<Decision, LedgerError> {
    if let Some(stored) = stored_digest {
        return if stored == posting.digest() {
            Ok(Decision::Duplicate)
        } else {
            Err(LedgerError::KeyReused(posting.key.clone()))
        };
    }
    check(posting, balance, allows_negative).map(Decision::Post)
}

/// How a posting was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Applied {
    /// Applied now.
    Posted,
    /// The same posting was applied earlier under this key; nothing changed.
    Duplicate,
}

/// An in-memory ledger: the reference the storage layer follows, and what the
/// property tests exercise.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Balance per (account, currency).
    pub balances: BTreeMap<(String, String), i64>,
    /// Digest per applied key.
    pub keys: BTreeMap<String, String>,
    /// Accounts that may go below zero besides the defaults' rule.
    pub overrides: BTreeMap<String, bool>,
}

impl Ledger {
    /// Whether `account` may go below zero.
    pub fn allows_negative(&self, account: &str) -> bool {
        self.overrides
            .get(account)
            .copied()
            .unwrap_or_else(|| default_allows_negative(account))
    }

    /// Applies `posting` once.
    pub fn apply(&mut self, posting: &Posting) -> Result<Applied, LedgerError> {
        let decision = decide(
            posting,
            self.keys.get(&posting.key).map(String::as_str),
            |a, c| {
                self.balances
                    .get(&(a.to_owned(), c.to_owned()))
                    .copied()
                    .unwrap_or(0)
            },
            |a| self.allows_negative(a),
        )?;
        let Decision::Post(new) = decision else {
            return Ok(Applied::Duplicate);
        };
        for (a, c, b) in new {
            self.balances.insert((a, c), b);
        }
        self.keys.insert(posting.key.clone(), posting.digest());
        Ok(Applied::Posted)
    }

    /// Sum of every balance per currency (zero when the books balance).
    pub fn totals(&self) -> BTreeMap<String, i128> {
        let mut t = BTreeMap::new();
        for ((_, c), b) in &self.balances {
            *t.entry(c.clone()).or_default() += i128::from(*b);
        }
        t
    }

    /// Accounts that may not go below zero.
    pub fn protected(&self) -> BTreeSet<String> {
        self.balances
            .keys()
            .map(|(a, _)| a.clone())
            .filter(|a| !self.allows_negative(a))
            .collect()
    }
}

/// A payment into a client's account (top-up, upfront fee, settlement of an invoice).
pub fn payment(
    key: &str,
    kind: &str,
    client_account: &str,
    currency: &str,
    amount: i64,
) -> Posting {
    Posting {
        key: key.to_owned(),
        kind: kind.to_owned(),
        memo: format!("{kind} from {client_account}"),
        entries: vec![
            Entry {
                account: EXTERNAL.into(),
                currency: currency.into(),
                amount: -amount,
            },
            Entry {
                account: client(client_account),
                currency: currency.into(),
                amount,
            },
        ],
    }
}

/// A payout from a provider's account to the outside world.
pub fn payout(key: &str, provider_account: &str, currency: &str, amount: i64) -> Posting {
    Posting {
        key: key.to_owned(),
        kind: "payout".into(),
        memo: format!("payout to {provider_account}"),
        entries: vec![
            Entry {
                account: provider(provider_account),
                currency: currency.into(),
                amount: -amount,
            },
            Entry {
                account: EXTERNAL.into(),
                currency: currency.into(),
                amount,
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(account: &str, currency: &str, amount: i64) -> Entry {
        Entry {
            account: account.into(),
            currency: currency.into(),
            amount,
        }
    }

    #[test]
    fn unbalanced_and_malformed_postings_are_refused_by_name() {
        let mut l = Ledger::default();
        let p = Posting {
            key: "k".into(),
            kind: "test".into(),
            memo: String::new(),
            entries: vec![entry("external", "EUR", -5), entry("client:a", "EUR", 4)],
        };
        assert!(matches!(
            l.apply(&p),
            Err(LedgerError::Unbalanced { sum: -1, .. })
        ));
        let p = Posting {
            entries: vec![entry("bank", "EUR", -5), entry("client:a", "EUR", 5)],
            ..p
        };
        assert!(l.apply(&p).unwrap_err().to_string().contains("bank"));
        assert!(l.balances.is_empty(), "nothing applied");
    }

    #[test]
    fn providers_cannot_be_paid_out_more_than_they_earned() {
        let mut l = Ledger::default();
        let err = l.apply(&payout("p1", "bob", "EUR", 10)).unwrap_err();
        assert!(
            matches!(
                err,
                LedgerError::Insufficient {
                    balance: 0,
                    needed: 10,
                    ..
                }
            ),
            "{err}"
        );
        l.overrides.insert(client("alice"), false);
        assert!(
            l.apply(&payment("t1", "topup", "alice", "EUR", 100))
                .is_ok()
        );
        assert_eq!(l.balances[&(client("alice"), "EUR".into())], 100);
    }

    #[test]
    fn a_reused_key_is_a_duplicate_or_a_conflict() {
        let mut l = Ledger::default();
        let p = payment("t1", "topup", "alice", "EUR", 100);
        assert_eq!(l.apply(&p), Ok(Applied::Posted));
        assert_eq!(l.apply(&p), Ok(Applied::Duplicate));
        assert_eq!(l.balances[&(client("alice"), "EUR".into())], 100);
        let other = payment("t1", "topup", "alice", "EUR", 101);
        assert_eq!(l.apply(&other), Err(LedgerError::KeyReused("t1".into())));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Pay(u8, i64),
        Bill(u8, u8, i64, u32),
        Payout(u8, i64),
        Transfer(u8, u8, i64),
        Prepaid(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 1i64..10_000).prop_map(|(c, a)| Op::Pay(c, a)),
            (0u8..3, 0u8..2, 1i64..10_000, 0u32..3000)
                .prop_map(|(c, p, a, bps)| Op::Bill(c, p, a, bps)),
            (0u8..2, 1i64..10_000).prop_map(|(p, a)| Op::Payout(p, a)),
            (0u8..2, 0u8..2, -10_000i64..10_000).prop_map(|(a, b, x)| Op::Transfer(a, b, x)),
            (0u8..3).prop_map(Op::Prepaid),
        ]
    }

    fn posting_of(op: &Op, i: usize) -> Option<Posting> {
        let cur = if i % 3 == 0 { "USD" } else { "EUR" };
        Some(match *op {
            Op::Pay(c, a) => payment(&format!("pay-{i}"), "topup", &format!("c{c}"), cur, a),
            Op::Bill(c, p, a, bps) => crate::billing::bill_posting(
                &format!("bill-{i}"),
                &format!("c{c}"),
                &format!("p{p}"),
                cur,
                a,
                bps,
            ),
            Op::Payout(p, a) => payout(&format!("out-{i}"), &format!("p{p}"), cur, a),
            Op::Transfer(a, b, x) => Posting {
                key: format!("tr-{i}"),
                kind: "transfer".into(),
                memo: String::new(),
                entries: vec![
                    entry(&provider(&format!("p{a}")), cur, -x),
                    entry(&provider(&format!("p{b}")), cur, x),
                ],
            },
            Op::Prepaid(_) => return None,
        })
    }

    proptest! {
        /// For random sequences of payments, billing runs, payouts and transfers:
        /// every currency sums to zero, no protected account is below zero, and
        /// applying any posting again under its key changes nothing.
        #[test]
        fn the_books_always_balance(ops in proptest::collection::vec(op(), 1..80)) {
            let mut l = Ledger::default();
            let mut applied = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                if let Op::Prepaid(c) = op {
                    // From now on this client may not be taken below zero.
                    l.overrides.insert(client(&format!("c{c}")), false);
                    continue;
                }
                let Some(p) = posting_of(op, i) else { continue };
                let before = l.balances.clone();
                match l.apply(&p) {
                    Ok(_) => {
                        // Whatever went down must not leave a protected account below zero.
                        for ((acc, cur), b) in &l.balances {
                            let old = before.get(&(acc.clone(), cur.clone())).copied().unwrap_or(0);
                            if *b < old && !l.allows_negative(acc) {
                                prop_assert!(*b >= 0, "{} went to {}", acc, b);
                            }
                        }
                        applied.push(p);
                    }
                    Err(_) => prop_assert_eq!(&before, &l.balances, "a refused posting changes nothing"),
                }
                for (_, total) in l.totals() {
                    prop_assert_eq!(total, 0);
                }
                for ((acc, _), b) in &l.balances {
                    if acc.starts_with("provider:") || acc == MARKETPLACE {
                        prop_assert!(*b >= 0, "{} at {}", acc, b);
                    }
                }
            }
            let snapshot = l.balances.clone();
            for p in &applied {
                prop_assert_eq!(l.apply(p), Ok(Applied::Duplicate));
            }
            prop_assert_eq!(snapshot, l.balances);
        }
    }
}
