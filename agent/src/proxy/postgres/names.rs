//! A connection's prepared statements and portals, as the server's answers
//! confirm them.
//!
//! The client names what it prepares, and a portal runs whatever its
//! statement's name held at its Bind, so the proxy must know what each name
//! holds on the server. The server may not do what it was sent: it refuses
//! a Parse of a name in use, skips every message after an error until the
//! next Sync (a Query, `DEALLOCATE` in it, included), and stops a Query's
//! statements at the first that fails. So a change is applied only when
//! the server's answer confirms it, and dropped otherwise. Whatever is
//! dropped, the proxy never believes a name holds a statement the server
//! does not run under it: a name the proxy knows holds what the proxy
//! judged, or nothing at all.
//!
//! The client may send on before the answers come. A message's lookup then
//! also sees the changes still on their way: those of its own batch (the
//! messages since the last Sync) are certain, since the server runs a
//! message only if everything before it in its batch succeeded; those of
//! earlier batches may or may not have happened, and a name they leave
//! with more than one possible statement is [`Lookup::Unsettled`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::Notify;

use crate::policy::sql::{Analysis, Verdict};

/// Changes the server has not answered yet, at most; beyond, the client's
/// side waits for answers (lookups read them all).
pub const MAX_PENDING: usize = 1024;

/// A prepared statement on the server, as the proxy judged it.
#[derive(Debug)]
pub struct Statement {
    /// What the client sent (`EXECUTE name` for one of SQL's `PREPARE`).
    pub sql: String,
    pub analysis: Arc<Analysis>,
    /// Its text normalized and the verdict Parse gave it; none for one of
    /// SQL's `PREPARE`, judged at each use.
    pub judged: Option<(String, Verdict)>,
}

/// What an Execute of a portal runs: the statement it was bound to, and
/// the parameters as the record shows them.
#[derive(Debug)]
pub struct Bound {
    pub statement: Arc<Statement>,
    pub parameters: Vec<String>,
}

/// A portal: what it runs, or why the proxy cannot tell (it was bound to a
/// statement the proxy did not know).
pub type Portal = Result<Bound, String>;

/// A change to the server's names, made when a message that makes it is
/// sent and applied when the server confirms it.
#[derive(Debug)]
pub enum Change {
    /// A statement defined (`Some`) or dropped (`None`) under a name.
    Statement(String, Option<Arc<Statement>>),
    /// `DEALLOCATE ALL`: every named statement dropped (not the unnamed).
    NoStatements,
    /// A portal bound (`Some`) or closed (`None`).
    Portal(String, Option<Arc<Portal>>),
}

/// Which sent message a change waits on the answer of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChangeId(u64);

/// What a name holds on the server, as far as the proxy can know.
#[derive(Debug)]
pub enum Lookup<T> {
    /// Nothing, or nothing the proxy knows of.
    Absent,
    Known(Arc<T>),
    /// More than one thing, depending on answers not yet come.
    Unsettled,
}

/// The names of one connection, shared by its two sides: the client's side
/// changes and looks up, the server's side confirms.
#[derive(Default)]
pub struct Names {
    state: Mutex<State>,
    /// Woken when the server's side settles changes.
    settled: Notify,
}

#[derive(Default)]
struct State {
    statements: HashMap<String, Arc<Statement>>,
    portals: HashMap<String, Arc<Portal>>,
    pending: VecDeque<Pending>,
    next: u64,
    /// The client's current batch (counts Syncs, and Queries, whose own
    /// failures do not stop what follows).
    batch: u64,
}

#[derive(Debug)]
struct Pending {
    id: ChangeId,
    batch: u64,
    change: Change,
}

impl Names {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; were it to, the maps are still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes one sent message makes, all confirmed or dropped together.
    pub fn change(&self, changes: impl IntoIterator<Item = Change>) -> ChangeId {
        let mut state = self.state();
        let id = ChangeId(state.next);
        state.next += 1;
        let batch = state.batch;
        state.pending.extend(changes.into_iter().map(|change| Pending { id, batch, change }));
        id
    }

    /// The messages sent from now on are a new batch.
    pub fn end_batch(&self) {
        self.state().batch += 1;
    }

    /// Are there more changes on their way than lookups should read?
    pub fn crowded(&self) -> bool {
        self.state().pending.len() >= MAX_PENDING
    }

    /// Waits until the server's side settles changes.
    pub async fn settled(&self) {
        self.settled.notified().await;
    }

    /// The server answered the message that made change `id` (`confirmed`:
    /// it succeeded) or skipped it. Changes before `id` not yet settled
    /// were skipped: dropping one only makes the proxy know less.
    pub fn settle(&self, id: ChangeId, confirmed: bool) {
        let mut state = self.state();
        while state.pending.front().is_some_and(|pending| pending.id <= id) {
            let Some(pending) = state.pending.pop_front() else { break };
            if confirmed && pending.id == id {
                state.apply(pending.change);
            }
        }
        drop(state);
        self.settled.notify_one();
    }

    pub fn statement(&self, name: &str) -> Lookup<Statement> {
        let state = self.state();
        state.lookup(state.statements.get(name), |change| match change {
            Change::Statement(changed, statement) if changed == name => Some(statement.as_ref()),
            Change::NoStatements if !name.is_empty() => Some(None),
            _ => None,
        })
    }

    pub fn portal(&self, name: &str) -> Lookup<Portal> {
        let state = self.state();
        state.lookup(state.portals.get(name), |change| match change {
            Change::Portal(changed, portal) if changed == name => Some(portal.as_ref()),
            _ => None,
        })
    }
}

impl State {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Statement(name, Some(statement)) => {
                self.statements.insert(name, statement);
            }
            Change::Statement(name, None) => {
                self.statements.remove(&name);
            }
            Change::NoStatements => self.statements.retain(|name, _| name.is_empty()),
            Change::Portal(name, Some(portal)) => {
                self.portals.insert(name, portal);
            }
            Change::Portal(name, None) => {
                self.portals.remove(&name);
            }
        }
    }

    /// What a name holds: `confirmed`, then the changes on their way that
    /// touch it (`touches` gives what a change leaves under the name).
    fn lookup<'s, T>(
        &'s self,
        confirmed: Option<&'s Arc<T>>,
        touches: impl Fn(&'s Change) -> Option<Option<&'s Arc<T>>>,
    ) -> Lookup<T> {
        let mut touched = self.pending.iter().rev().filter_map(|p| Some((p.batch, touches(&p.change)?)));
        let Some((batch, latest)) = touched.next() else {
            return confirmed.map_or(Lookup::Absent, |known| Lookup::Known(known.clone()));
        };
        if batch == self.batch {
            // The server runs the message being judged only if the rest of
            // its batch, this change too, succeeded.
            return latest.map_or(Lookup::Absent, |known| Lookup::Known(known.clone()));
        }
        // Any of these may be what the name holds; none means nothing runs.
        let mut possible = std::iter::once(latest).chain(touched.map(|(_, held)| held)).chain([confirmed]).flatten();
        let Some(first) = possible.next() else { return Lookup::Absent };
        if possible.all(|other| Arc::ptr_eq(first, other)) { Lookup::Known(first.clone()) } else { Lookup::Unsettled }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(sql: &str) -> Arc<Statement> {
        Arc::new(Statement { sql: sql.to_owned(), analysis: Arc::default(), judged: None })
    }

    fn known_sql(lookup: Lookup<Statement>) -> Option<String> {
        match lookup {
            Lookup::Known(statement) => Some(statement.sql.clone()),
            Lookup::Absent => None,
            Lookup::Unsettled => Some("unsettled".to_owned()),
        }
    }

    #[test]
    fn a_change_counts_once_the_server_confirms_it_and_never_if_it_does_not() {
        let names = Names::default();
        let delete = names.change([Change::Statement("s".into(), Some(statement("DELETE")))]);
        assert_eq!(known_sql(names.statement("s")).as_deref(), Some("DELETE"), "certain within its batch");
        names.end_batch();
        names.settle(delete, true);
        // A batch that fails: its DEALLOCATE and its Parse never happen.
        let dropped = names.change([Change::Statement("s".into(), None)]);
        let replaced = names.change([Change::Statement("s".into(), Some(statement("SELECT 1")))]);
        names.end_batch();
        assert_eq!(known_sql(names.statement("s")).as_deref(), Some("unsettled"), "DELETE or SELECT 1");
        names.settle(dropped, false);
        names.settle(replaced, false);
        assert_eq!(known_sql(names.statement("s")).as_deref(), Some("DELETE"));
    }

    #[test]
    fn an_earlier_batch_that_only_drops_or_repeats_leaves_one_statement() {
        let names = Names::default();
        let select = statement("SELECT 1");
        let first = names.change([Change::Statement("s".into(), Some(select.clone()))]);
        names.end_batch();
        names.settle(first, true);
        names.change([Change::Statement("s".into(), None)]);
        names.change([Change::Statement("s".into(), Some(select))]);
        names.end_batch();
        // Nothing, or the same statement: the proxy knows what may run.
        assert_eq!(known_sql(names.statement("s")).as_deref(), Some("SELECT 1"));
        // DEALLOCATE ALL leaves the unnamed statement.
        names.change([Change::Statement(String::new(), Some(statement("SELECT 2")))]);
        names.change([Change::NoStatements]);
        assert_eq!(known_sql(names.statement("s")), None);
        assert_eq!(known_sql(names.statement("")).as_deref(), Some("SELECT 2"));
    }

    #[test]
    fn settling_a_later_change_drops_the_earlier_ones_never_answered() {
        let names = Names::default();
        names.change([Change::Statement("a".into(), Some(statement("SELECT a")))]);
        let later = names.change([Change::Statement("b".into(), Some(statement("SELECT b")))]);
        names.end_batch();
        names.settle(later, true);
        assert_eq!(known_sql(names.statement("a")), None);
        assert_eq!(known_sql(names.statement("b")).as_deref(), Some("SELECT b"));
        assert!(!names.crowded());
    }
}
