//! The session log's writer yields the CPU to the processes it records.
//!
//! On a small host the writer committing a batch takes a core for
//! milliseconds, and the sessions it records (a proxied request, a loop of
//! connects) wait for it. So while the writer keeps up it runs at idle
//! priority (`SCHED_IDLE`): it uses only CPU time nothing else wants. It is
//! raised back to normal priority when someone waits on it (a session
//! opening, a flush), when its queue grows past [`CATCH_UP_AT`] (or half of
//! what a smaller queue lets kernel events take), or when it
//! has taken nothing for a [`NUDGE_EVERY`] while work waits: a busy host must
//! neither starve the log into dropping records nor leave them unwritten.
//! A starved writer cannot notice any of this, so whoever queues work
//! raises it, and a nudger thread watches for a writer that makes no
//! progress.
//!
//! Returning from idle priority needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of
//! at least 20 (the unit's `LimitNICE=`). Where neither is there the writer
//! never lowers itself.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::SeqCst},
};

/// Ops queued past which the writer runs at normal priority.
pub const CATCH_UP_AT: usize = 10_000;
/// How long work may wait on a writer that takes nothing before it is raised.
pub const NUDGE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Shared between the writer thread and everyone who queues work for it.
#[derive(Debug)]
pub struct Yielding {
    /// May the writer lower itself (can it be raised again)?
    allowed: bool,
    /// The writer thread's id, once it runs.
    tid: AtomicI32,
    /// Is it at idle priority now? Whoever flips this to false raises it.
    idle: AtomicBool,
    /// Ops queued and not yet taken by the writer.
    backlog: AtomicUsize,
    /// Ops the writer has taken, ever: the nudger's measure of progress.
    taken: AtomicU64,
    /// Queued ops somebody waits on, not yet answered.
    waited_on: AtomicUsize,
    /// Raised by the nudger: the next batch is committed at normal priority.
    nudged: AtomicBool,
    /// Queued ops that raise the writer; it lowers itself only below a
    /// quarter of this.
    catch_up_at: usize,
}

impl Yielding {
    /// Finds out whether this process may return a thread from idle priority.
    /// It is raised once `catch_up_at` ops wait (at most [`CATCH_UP_AT`]).
    pub fn new(catch_up_at: usize) -> Self {
        let allowed = std::thread::spawn(|| set_own_policy(libc::SCHED_IDLE) && set_own_policy(libc::SCHED_OTHER))
            .join()
            .unwrap_or(false);
        if allowed {
            tracing::info!("the session log writer yields the CPU to sessions while it keeps up (idle priority)");
        } else {
            tracing::info!(
                "the session log writer runs at normal priority: raising it again from idle priority needs CAP_SYS_NICE or LimitNICE=20"
            );
        }
        Self::with(allowed, catch_up_at)
    }

    fn with(allowed: bool, catch_up_at: usize) -> Self {
        Self {
            catch_up_at: catch_up_at.clamp(1, CATCH_UP_AT),
            allowed,
            tid: AtomicI32::new(0),
            idle: AtomicBool::new(false),
            backlog: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            waited_on: AtomicUsize::new(0),
            nudged: AtomicBool::new(false),
        }
    }

    /// Ops queued and not yet taken by the writer.
    pub fn backlog(&self) -> usize {
        self.backlog.load(SeqCst)
    }

    /// The writer thread calls this first.
    pub fn writer_started(&self) {
        self.tid.store(nix::unistd::gettid().as_raw(), SeqCst);
    }

    /// An op was queued (`waited_on`: its sender waits until it is committed).
    pub fn queued(&self, waited_on: bool) {
        let backlog = self.backlog.fetch_add(1, SeqCst) + 1;
        if waited_on {
            self.waited_on.fetch_add(1, SeqCst);
        }
        if waited_on || backlog >= self.catch_up_at {
            self.raise();
        }
    }

    /// An op could not be queued after all.
    pub fn refused(&self, waited_on: bool) {
        self.backlog.fetch_sub(1, SeqCst);
        if waited_on {
            self.waited_on.fetch_sub(1, SeqCst);
        }
    }

    /// The writer took an op off the queue.
    pub fn taken(&self) {
        self.backlog.fetch_sub(1, SeqCst);
        self.taken.fetch_add(1, SeqCst);
    }

    /// The writer answered an op somebody waited on (after its commit).
    pub fn answered(&self) {
        self.waited_on.fetch_sub(1, SeqCst);
    }

    /// The writer, before it commits a batch: lowers itself while nothing
    /// waits on it, its queue is short and it was not just nudged.
    pub fn settle(&self) {
        let nudged = self.nudged.swap(false, SeqCst);
        if !self.allowed || nudged || !self.calm() || self.idle.load(SeqCst) {
            return;
        }
        if !set_own_policy(libc::SCHED_IDLE) {
            return;
        }
        self.idle.store(true, SeqCst);
        // Work queued while it lowered itself found `idle` still false and
        // raised nothing: look again.
        if !self.calm() {
            self.raise();
        }
    }

    fn calm(&self) -> bool {
        self.waited_on.load(SeqCst) == 0 && self.backlog.load(SeqCst) < self.catch_up_at / 4
    }

    /// The nudger: work waits and the writer has taken nothing since
    /// `taken_before` (what it had taken at the last look): raise it for a batch.
    fn nudge(&self, taken_before: u64) -> u64 {
        let taken = self.taken.load(SeqCst);
        if taken == taken_before && self.backlog.load(SeqCst) > 0 && self.idle.load(SeqCst) {
            self.nudged.store(true, SeqCst);
            self.raise();
        }
        taken
    }

    /// Starts the nudger thread; it ends once `yielding` is dropped.
    pub fn start_nudger(yielding: &Arc<Self>) -> std::io::Result<()> {
        if !yielding.allowed {
            return Ok(());
        }
        let weak = Arc::downgrade(yielding);
        std::thread::Builder::new().name("session-log-nudge".into()).spawn(move || {
            let mut taken = 0;
            loop {
                std::thread::sleep(NUDGE_EVERY);
                match weak.upgrade() {
                    Some(yielding) => taken = yielding.nudge(taken),
                    None => break,
                }
            }
        })?;
        Ok(())
    }

    /// Back to normal priority, if lowered (exactly one caller does it).
    fn raise(&self) {
        if !self.idle.swap(false, SeqCst) {
            return;
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain syscall on a thread of this process with a valid parameter.
        if unsafe { libc::sched_setscheduler(self.tid.load(SeqCst), libc::SCHED_OTHER, &param) } != 0 {
            tracing::error!(
                error = %std::io::Error::last_os_error(),
                "cannot return the session log writer to normal priority; records may be late"
            );
        }
    }
}

/// Sets the calling thread's scheduling policy; false if refused.
fn set_own_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread (0) with a valid parameter.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy of thread `tid` (0: the caller).
    fn policy_of(tid: i32) -> libc::c_int {
        // SAFETY: a plain syscall.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// Runs `step` on another thread, as a sender or the nudger would.
    fn elsewhere(yielding: &Arc<Yielding>, step: impl FnOnce(&Yielding) + Send + 'static) {
        let yielding = yielding.clone();
        std::thread::spawn(move || step(&yielding)).join().expect("other thread");
    }

    #[test]
    fn the_writer_lowers_itself_only_when_calm_and_is_raised_by_waiting_work_a_long_queue_or_no_progress() {
        let yielding = Arc::new(Yielding::new(CATCH_UP_AT));
        assert!(yielding.allowed, "tests run as root, which may return from idle priority");
        let writer = yielding.clone();
        let seen = std::thread::spawn(move || {
            let y = &writer;
            y.writer_started();
            let mut seen = Vec::new();
            y.settle();
            seen.push(("calm: lowered", policy_of(0), libc::SCHED_IDLE));
            elsewhere(y, |y| y.queued(true));
            seen.push(("a session opening raises it", policy_of(0), libc::SCHED_OTHER));
            y.settle();
            seen.push(("not lowered while it is waited on", policy_of(0), libc::SCHED_OTHER));
            y.taken();
            y.answered();
            y.settle();
            seen.push(("answered: lowered again", policy_of(0), libc::SCHED_IDLE));
            elsewhere(y, |y| (0..CATCH_UP_AT).for_each(|_| y.queued(false)));
            seen.push(("a long queue raises it", policy_of(0), libc::SCHED_OTHER));
            y.settle();
            seen.push(("not lowered with a long queue", policy_of(0), libc::SCHED_OTHER));
            (0..CATCH_UP_AT).for_each(|_| y.taken());
            y.settle();
            seen.push(("caught up: lowered again", policy_of(0), libc::SCHED_IDLE));
            elsewhere(y, |y| y.queued(false));
            seen.push(("a little work does not raise it", policy_of(0), libc::SCHED_IDLE));
            let taken = y.taken.load(SeqCst);
            elsewhere(y, move |y| {
                y.nudge(taken);
            });
            seen.push(("no progress since the last look: raised", policy_of(0), libc::SCHED_OTHER));
            y.settle();
            seen.push(("nudged: the next batch at normal priority", policy_of(0), libc::SCHED_OTHER));
            y.taken();
            y.settle();
            seen.push(("then lowered again", policy_of(0), libc::SCHED_IDLE));
            elsewhere(y, |y| y.queued(false));
            let taken = y.taken.load(SeqCst) - 1;
            elsewhere(y, move |y| {
                y.nudge(taken);
            });
            seen.push(("progress since the last look: left alone", policy_of(0), libc::SCHED_IDLE));
            seen
        })
        .join()
        .expect("writer");
        for (what, policy, want) in seen {
            assert_eq!(policy, want, "{what}");
        }
    }

    #[test]
    fn a_writer_that_could_not_be_raised_again_never_lowers_itself() {
        let yielding = Yielding::with(false, CATCH_UP_AT);
        std::thread::scope(|s| {
            s.spawn(|| {
                yielding.writer_started();
                yielding.settle();
                assert_eq!(policy_of(0), libc::SCHED_OTHER);
            });
        });
    }
}
