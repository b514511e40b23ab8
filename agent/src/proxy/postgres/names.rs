//! A connection's prepared statements and portals, as the server's answers
//! confirm them.
//!
//! The client names what it prepares, and a portal runs whatever its
//! statement's name held at its Bind, so the proxy must know what each name
//! holds on the server. The server may not do what it was sent: it refuses
//! a Parse of a name in use, skips every message after an error until the
//! next Sync (a Query, `DEALLOCATE` in it, included), and stops a Query's
//! statements at the first that fails. So a change is applied only when
//! the server's answer confirms it, and dropped otherwise; of a string of
//! statements that failed part way, what it created counts (the proxy lets
//! it create only names it knows free). So a name the proxy knows holds
//! what the proxy judged, or nothing at all; and a name it does not know
//! holds nothing (so a lookup may weigh pending changes against it). A
//! `DEALLOCATE` or `CLOSE` that fails because its name is not there
//! ([`Outcome::NotThere`]) frees the name, which would otherwise stay taken.
//! The one way past this is a function that runs `PREPARE` or opens a
//! cursor as dynamic SQL; a function the rules let run can as well change
//! data itself.
//!
//! The client may send on before the answers come. A message's lookup then
//! also sees the changes still on their way: those of its own batch (the
//! messages since the last Sync) are certain, since the server runs a
//! message only if everything before it in its batch succeeded; those of
//! earlier batches may or may not have happened, and a name they leave
//! with more than one possible statement is [`Lookup::Unsettled`].
//!
//! The server's side settles changes in the order they were made, as its
//! answers come in that order; an answer out of that order means the proxy
//! no longer knows what the server does ([`Desync`]).

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

/// A portal (a cursor, in SQL's words).
#[derive(Debug)]
pub enum Portal {
    /// Bound by the protocol to a statement the proxy judged.
    Bound(Bound),
    /// Bound to a statement the proxy could not tell, and why: not run.
    Unjudged(String),
    /// Opened by SQL's `DECLARE`, whose query was judged then (`hold`:
    /// `WITH HOLD`, it outlives its transaction).
    Cursor { hold: bool },
}

/// A change to the server's names, made when a message that makes it is
/// sent and applied when the server confirms it.
#[derive(Debug)]
pub enum Change {
    /// A statement defined (`Some`) or dropped (`None`) under a name.
    Statement(String, Option<Arc<Statement>>),
    /// `DEALLOCATE ALL`: every named statement dropped (not the unnamed).
    NoStatements,
    /// A portal bound or declared (`Some`), or closed (`None`).
    Portal(String, Option<Arc<Portal>>),
    /// `CLOSE ALL`: every portal closed.
    NoPortals,
}

/// What the server did with a message that makes changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran: every change counts.
    Ran,
    /// A string of several statements failed part way: what it created
    /// may exist, what it dropped may not be gone.
    PartWay,
    /// It failed: nothing changed.
    Failed,
    /// It failed because a name it drops is not there (SQLSTATE 26000 or
    /// 34000, of a Query of a single statement): the name holds nothing.
    NotThere,
    /// The server skipped it: nothing changed.
    Skipped,
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
    next_id: u64,
    /// The client's current batch (counts Syncs, and Queries, whose own
    /// failures do not stop what follows).
    current_batch: u64,
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
        let id = ChangeId(state.next_id);
        state.next_id += 1;
        let batch = state.current_batch;
        state.pending.extend(changes.into_iter().map(|change| Pending { id, batch, change }));
        id
    }

    /// The messages sent from now on are a new batch.
    pub fn end_batch(&self) {
        self.state().current_batch += 1;
    }

    /// Are there more changes on their way than lookups should read?
    pub fn crowded(&self) -> bool {
        self.state().pending.len() >= MAX_PENDING
    }

    /// Waits until the server's side settles changes.
    pub async fn settled(&self) {
        self.settled.notified().await;
    }

    /// The server answered the message that made change `id`, or skipped it.
    pub fn settle(&self, id: ChangeId, outcome: Outcome) -> Result<(), Desync> {
        let mut state = self.state();
        if state.pending.front().is_some_and(|pending| pending.id < id) {
            // An earlier change unanswered: were it dropped, a name it
            // replaced would keep what the server no longer holds.
            return Err(Desync);
        }
        while state.pending.front().is_some_and(|pending| pending.id == id) {
            let Some(pending) = state.pending.pop_front() else { break };
            state.apply(pending.change, outcome);
        }
        drop(state);
        self.settled.notify_one();
        Ok(())
    }

    /// The server's transaction ended (ReadyForQuery, idle): its portals
    /// are gone but for cursors declared `WITH HOLD`.
    pub fn end_transaction(&self) {
        self.state().portals.retain(|_, portal| matches!(portal.as_ref(), Portal::Cursor { hold: true }));
    }

    pub fn statement(&self, name: &str) -> Lookup<Statement> {
        let state = self.state();
        state.lookup(state.statements.get(name), |change| match change {
            Change::Statement(changed, statement) if changed == name => Touch::Leaves(statement.as_ref()),
            Change::NoStatements if !name.is_empty() => Touch::Leaves(None),
            _ => Touch::Untouched,
        })
    }

    pub fn portal(&self, name: &str) -> Lookup<Portal> {
        let state = self.state();
        state.lookup(state.portals.get(name), |change| match change {
            Change::Portal(changed, portal) if changed == name => Touch::Leaves(portal.as_ref()),
            Change::NoPortals => Touch::Leaves(None),
            _ => Touch::Untouched,
        })
    }
}

/// The server's answers no longer follow the messages sent.
#[derive(Debug)]
pub struct Desync;

/// What a change does to one name.
enum Touch<'s, T> {
    Untouched,
    /// The name holds this afterwards (`None`: nothing).
    Leaves(Option<&'s Arc<T>>),
}

impl State {
    /// Applies what of a change the outcome says happened: a create that
    /// may have happened counts (a name the proxy knows may hold nothing),
    /// a drop only when it surely happened (a name the proxy does not know
    /// must hold nothing).
    fn apply(&mut self, change: Change, outcome: Outcome) {
        let created = matches!(outcome, Outcome::Ran | Outcome::PartWay);
        let dropped = matches!(outcome, Outcome::Ran | Outcome::NotThere);
        match change {
            Change::Statement(name, Some(statement)) if created => {
                self.statements.insert(name, statement);
            }
            Change::Statement(name, None) if dropped => {
                self.statements.remove(&name);
            }
            Change::NoStatements if dropped => self.statements.retain(|name, _| name.is_empty()),
            Change::Portal(name, Some(portal)) if created => {
                self.portals.insert(name, portal);
            }
            Change::Portal(name, None) if dropped => {
                self.portals.remove(&name);
            }
            Change::NoPortals if dropped => self.portals.clear(),
            _ => {}
        }
    }

    /// What a name holds: `confirmed`, then the changes on their way that
    /// touch it (`touches` gives what a change leaves under the name).
    fn lookup<'s, T>(
        &'s self,
        confirmed: Option<&'s Arc<T>>,
        touches: impl Fn(&'s Change) -> Touch<'s, T>,
    ) -> Lookup<T> {
        let mut touched = self.pending.iter().rev().filter_map(|p| match touches(&p.change) {
            Touch::Leaves(held) => Some((p.batch, held)),
            Touch::Untouched => None,
        });
        let Some((batch, latest)) = touched.next() else {
            return confirmed.map_or(Lookup::Absent, |known| Lookup::Known(known.clone()));
        };
        if batch == self.current_batch {
            // The server runs the message being judged only if the rest of
            // its batch, this change too, succeeded.
            return latest.map_or(Lookup::Absent, |known| Lookup::Known(known.clone()));
        }
        // Any of these may be what the name holds. Nothing is no rival: a
        // statement that is not there runs nothing, and a portal the proxy
        // does not know is no bound one (see the module's notes).
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
        names.settle(delete, Outcome::Ran).expect("in order");
        // A batch that fails: its DEALLOCATE and its Parse never happen.
        let dropped = names.change([Change::Statement("s".into(), None)]);
        let replaced = names.change([Change::Statement("s".into(), Some(statement("SELECT 1")))]);
        names.end_batch();
        assert_eq!(known_sql(names.statement("s")).as_deref(), Some("unsettled"), "DELETE or SELECT 1");
        names.settle(dropped, Outcome::Skipped).expect("in order");
        names.settle(replaced, Outcome::Skipped).expect("in order");
        assert_eq!(known_sql(names.statement("s")).as_deref(), Some("DELETE"));
    }

    #[test]
    fn an_earlier_batch_that_only_drops_or_repeats_leaves_one_statement() {
        let names = Names::default();
        let select = statement("SELECT 1");
        let first = names.change([Change::Statement("s".into(), Some(select.clone()))]);
        names.end_batch();
        names.settle(first, Outcome::Ran).expect("in order");
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
    fn a_cursor_rivals_a_bound_portal_and_a_transaction_end_forgets_both() {
        let names = Names::default();
        let bound = Portal::Bound(Bound { statement: statement("SELECT 1"), parameters: Vec::new() });
        let bind = names.change([Change::Portal("p".into(), Some(Arc::new(bound)))]);
        names.end_batch();
        names.settle(bind, Outcome::Ran).expect("in order");
        let declare = names.change([Change::Portal("p".into(), Some(Arc::new(Portal::Cursor { hold: true })))]);
        names.end_batch();
        assert!(matches!(names.portal("p"), Lookup::Unsettled), "the bound statement or the cursor");
        names.settle(declare, Outcome::Ran).expect("in order");
        assert!(matches!(names.portal("p"), Lookup::Known(cursor) if matches!(*cursor, Portal::Cursor { .. })));
        names.end_transaction();
        assert!(matches!(names.portal("p"), Lookup::Known(_)), "a cursor WITH HOLD outlives it");
        let bound = Portal::Bound(Bound { statement: statement("SELECT 2"), parameters: Vec::new() });
        let bind = names.change([Change::Portal("b".into(), Some(Arc::new(bound)))]);
        let declare = names.change([Change::Portal("c".into(), Some(Arc::new(Portal::Cursor { hold: false })))]);
        names.settle(bind, Outcome::Ran).expect("in order");
        names.settle(declare, Outcome::Ran).expect("in order");
        names.end_transaction();
        assert!(matches!(names.portal("b"), Lookup::Absent), "a bound portal ends with its transaction");
        assert!(matches!(names.portal("c"), Lookup::Absent), "and a cursor without HOLD");
        names.change([Change::Portal("q".into(), Some(Arc::new(Portal::Cursor { hold: false })))]);
        names.change([Change::NoPortals]);
        assert!(matches!(names.portal("q"), Lookup::Absent), "CLOSE ALL, in the same batch");
    }

    #[test]
    fn a_string_that_failed_part_way_leaves_what_it_created_and_what_it_dropped() {
        let names = Names::default();
        let old = names.change([Change::Statement("old".into(), Some(statement("SELECT old")))]);
        names.settle(old, Outcome::Ran).expect("in order");
        let string = names.change([
            Change::Statement("old".into(), None),
            Change::Statement("new".into(), Some(statement("DELETE"))),
            Change::Portal("c".into(), Some(Arc::new(Portal::Cursor { hold: false }))),
        ]);
        names.end_batch();
        names.settle(string, Outcome::PartWay).expect("in order");
        assert_eq!(known_sql(names.statement("old")).as_deref(), Some("SELECT old"), "the drop may not have run");
        assert_eq!(known_sql(names.statement("new")).as_deref(), Some("DELETE"));
        assert!(matches!(names.portal("c"), Lookup::Known(_)));
    }

    #[test]
    fn a_drop_that_failed_for_want_of_its_name_frees_it() {
        let names = Names::default();
        let stale = names.change([Change::Statement("w".into(), Some(statement("SELECT w")))]);
        names.settle(stale, Outcome::PartWay).expect("in order");
        let aborted = names.change([Change::Statement("w".into(), None)]);
        names.settle(aborted, Outcome::Failed).expect("in order");
        assert_eq!(known_sql(names.statement("w")).as_deref(), Some("SELECT w"), "in an aborted transaction, say");
        let missing = names.change([Change::Statement("w".into(), None)]);
        names.settle(missing, Outcome::NotThere).expect("in order");
        assert_eq!(known_sql(names.statement("w")), None);
    }

    #[test]
    fn an_answer_out_of_order_is_a_desync() {
        let names = Names::default();
        names.change([Change::Statement("a".into(), Some(statement("SELECT a")))]);
        let later = names.change([Change::Statement("b".into(), Some(statement("SELECT b")))]);
        names.end_batch();
        assert!(names.settle(later, Outcome::Ran).is_err());
        assert!(!names.crowded());
    }
}
