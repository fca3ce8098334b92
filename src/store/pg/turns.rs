//! This node's own deliveries, put in line with the other nodes' notices.
//!
//! Message ids commit in id order across nodes (the `ORDER` lock), and PostgreSQL
//! hands every listener the notices in commit order. But this node learns that its
//! own message committed from the writer, and another node's earlier message from the
//! listener, and the two race: a socket here could get message 11 (ours) before 10
//! (theirs). So the completion of a write that sent a notice (it broadcasts and
//! acks) does not run when the writer commits. The completion thread parks it here
//! under its notice's *ticket* (a number this node gives its notices, in commit
//! order), and the `pg-listen` thread runs it when the notice itself comes back
//! through `LISTEN` — after every notice committed before it, as the other nodes'
//! sockets see it.
//!
//! A parked completion never waits long: the listener waits at most [`WAIT`] for one
//! whose notice it has already heard (the writer may not have seen COMMIT return
//! yet), runs one whose notice is older than [`STALE`] anyway, and runs them all at
//! once when it stops or loses its connection. While nobody listens (the CLI, or a
//! lost connection) completions run at once.
//!
//! Threads: `pg-done` calls [`Turns::park`]; `pg-listen` calls the rest.

use crate::sync::lock;
use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the listener waits for the completion of a notice it heard.
pub(super) const WAIT: Duration = Duration::from_secs(2);
/// A completion parked this long runs without its notice (which was lost).
pub(super) const STALE: Duration = Duration::from_secs(2);

type Completion = Box<dyn FnOnce() + Send>;

/// Parked completions, by ticket.
#[derive(Default)]
pub(super) struct Turns {
    state: Mutex<State>,
    parked: Condvar,
}

#[derive(Default)]
struct State {
    /// Whether the listener hears this node's notices (else nothing is parked).
    listening: bool,
    /// The newest ticket the listener has passed.
    passed: u64,
    waiting: BTreeMap<u64, (Instant, Completion)>,
}

impl Turns {
    /// Runs `completion` in its turn: when the listener hears notice `ticket`, or at
    /// once if nobody listens or the listener has already passed it.
    pub(super) fn park(&self, ticket: u64, completion: Completion) {
        let mut s = lock(&self.state);
        if !s.listening || ticket <= s.passed {
            drop(s);
            completion();
            return;
        }
        s.waiting.insert(ticket, (Instant::now(), completion));
        drop(s);
        self.parked.notify_all();
    }

    /// The listener heard this node's notice `ticket`: runs every completion up to and
    /// including it, in ticket order, waiting up to [`WAIT`] for its own.
    pub(super) fn heard(&self, ticket: u64) {
        let deadline = Instant::now() + WAIT;
        let mut s = lock(&self.state);
        // Not parking: its completion ran when it committed.
        while s.listening && !s.waiting.contains_key(&ticket) && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            s = crate::sync::wait_timeout(&self.parked, s, left);
        }
        s.passed = s.passed.max(ticket);
        let later = s.waiting.split_off(&(ticket + 1));
        let due = std::mem::replace(&mut s.waiting, later);
        drop(s);
        for (_, (_, completion)) in due {
            completion();
        }
    }

    /// Runs the completions parked longer than [`STALE`] (their notices were lost).
    pub(super) fn run_stale(&self) {
        let mut s = lock(&self.state);
        let Some(cut) = s
            .waiting
            .iter()
            .filter(|(_, (since, _))| since.elapsed() >= STALE)
            .map(|(t, _)| *t)
            .max()
        else {
            return;
        };
        s.passed = s.passed.max(cut);
        let later = s.waiting.split_off(&(cut + 1));
        let due = std::mem::replace(&mut s.waiting, later);
        drop(s);
        for (_, (_, completion)) in due {
            completion();
        }
    }

    /// Starts or stops parking; stopping runs everything parked, in order.
    pub(super) fn set_listening(&self, listening: bool) {
        let mut s = lock(&self.state);
        s.listening = listening;
        if listening {
            return;
        }
        let due = std::mem::take(&mut s.waiting);
        drop(s);
        for (_, (_, completion)) in due {
            completion();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn recorder() -> (Arc<Mutex<Vec<u64>>>, impl Fn(u64) -> Completion) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (log, move |n| {
            let l = l.clone();
            Box::new(move || l.lock().unwrap().push(n))
        })
    }

    /// Completions wait for their notice and then run in ticket order; one whose
    /// notice was heard before it was parked is waited for; without a listener they
    /// run at once.
    #[test]
    fn completions_run_in_the_order_their_notices_are_heard() {
        let turns = Arc::new(Turns::default());
        let (log, job) = recorder();
        turns.park(1, job(1));
        assert_eq!(*log.lock().unwrap(), vec![1], "not listening: at once");
        turns.set_listening(true);
        turns.park(3, job(3));
        turns.park(2, job(2));
        assert_eq!(log.lock().unwrap().len(), 1, "parked until heard");
        turns.heard(2);
        assert_eq!(*log.lock().unwrap(), vec![1, 2]);
        let t = turns.clone();
        let later = std::thread::spawn(move || t.heard(4));
        std::thread::sleep(Duration::from_millis(50));
        turns.park(4, job(4));
        later.join().unwrap();
        assert_eq!(*log.lock().unwrap(), vec![1, 2, 3, 4]);
        turns.park(4, job(40));
        assert_eq!(
            log.lock().unwrap().last(),
            Some(&40),
            "already passed: at once"
        );
        turns.park(5, job(5));
        turns.set_listening(false);
        assert_eq!(
            log.lock().unwrap().last(),
            Some(&5),
            "stopping runs what waits"
        );
    }
}
