//! Background threads with one lifecycle: started by their owner's `start`, stopped by
//! its `stop`, which signals the thread and joins it.
//!
//! Every long-lived thread parley runs (the database writer and its completion
//! thread, the checkpointer, fan-out, the flusher, the expiry timer, the revocation
//! sweep, the HTTP reaper, the accept watch, the password threads, the tarpit) is a
//! [`Worker`]; the periodic ones are a [`Periodic`], which a [`Nudger`] can make tick
//! early. (HTTP workers and IO threads are pools with their own `stop`, in
//! [`crate::front`] and [`crate::lane`].) [`crate::server`] starts them all in one
//! place and stops them in order on shutdown, so no thread outlives the state it uses.

use crate::sync::{lock, wait_timeout};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Stack size of service threads: they keep shallow stacks, and there are few of them.
pub const SERVICE_STACK: usize = 256 * 1024;

/// A named background thread that can be joined once.
pub struct Worker {
    name: String,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Starts `f` on a new thread called `name`.
    pub fn spawn(
        name: impl Into<String>,
        stack: usize,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Worker> {
        let name = name.into();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .stack_size(stack)
            .spawn(f)?;
        Ok(Worker {
            name,
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Waits for the thread to end (its owner must have told it to). Later calls, and
    /// a call from the thread itself, return at once.
    pub fn join(&self) {
        let handle = lock(&self.handle).take();
        if let Some(h) = handle {
            if h.thread().id() == std::thread::current().id() {
                return;
            }
            if h.join().is_err() {
                log::error!("the {} thread panicked", self.name);
            }
        }
    }
}

/// A flag a thread checks to know it should end, with a wake-up for its sleeps; a
/// nudge ends one sleep early without stopping the thread.
#[derive(Default)]
pub struct StopSignal {
    flags: Mutex<Flags>,
    wake: Condvar,
}

#[derive(Default)]
struct Flags {
    stopped: bool,
    nudged: bool,
}

/// How a [`StopSignal::nap`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The time was up.
    TimeUp,
    /// Someone called [`StopSignal::nudge`].
    Nudged,
    /// Someone called [`StopSignal::stop`].
    Stopped,
}

impl StopSignal {
    /// Tells the thread to end and wakes it.
    pub fn stop(&self) {
        lock(&self.flags).stopped = true;
        self.wake.notify_all();
    }

    /// Ends the thread's current (or next) sleep early.
    pub fn nudge(&self) {
        lock(&self.flags).nudged = true;
        self.wake.notify_all();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        lock(&self.flags).stopped
    }

    /// Sleeps for `d` unless stopped first; returns false once stopped. A nudge ends
    /// the sleep early (returning true).
    pub fn sleep(&self, d: Duration) -> bool {
        self.nap(d) != Woke::Stopped
    }

    /// Sleeps for `d`, or until nudged or stopped; says which.
    pub fn nap(&self, d: Duration) -> Woke {
        let deadline = Instant::now() + d;
        let mut flags = lock(&self.flags);
        loop {
            if flags.stopped {
                return Woke::Stopped;
            }
            if std::mem::take(&mut flags.nudged) {
                return Woke::Nudged;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Woke::TimeUp;
            }
            flags = wait_timeout(&self.wake, flags, left);
        }
    }
}

/// A thread that runs `tick` every `period` until stopped.
pub struct Periodic {
    signal: Arc<StopSignal>,
    worker: Worker,
}

impl Periodic {
    /// Starts the thread; the first tick comes one period after the start.
    pub fn start(
        name: &str,
        period: Duration,
        mut tick: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Periodic> {
        let signal = Arc::new(StopSignal::default());
        let s = signal.clone();
        let worker = Worker::spawn(name, SERVICE_STACK, move || {
            while s.sleep(period) {
                tick();
            }
        })?;
        Ok(Periodic { signal, worker })
    }

    /// Stops the thread (a tick under way finishes first) and joins it.
    pub fn stop(&self) {
        self.signal.stop();
        self.worker.join();
    }

    /// A handle that makes the thread tick now rather than at the end of its period.
    pub fn nudger(&self) -> Nudger {
        Nudger(self.signal.clone())
    }
}

/// Makes a [`Periodic`] tick early; cheap to clone and safe to call from any thread.
#[derive(Clone)]
pub struct Nudger(Arc<StopSignal>);

impl Nudger {
    /// Asks for a tick as soon as the one under way (if any) is done.
    pub fn nudge(&self) {
        self.0.nudge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn periodic_ticks_until_stopped_and_stop_is_prompt() {
        let ticks = Arc::new(AtomicU32::new(0));
        let t = ticks.clone();
        let p = Periodic::start("test-tick", Duration::from_millis(10), move || {
            t.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ticks.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "no ticks");
            std::thread::sleep(Duration::from_millis(5));
        }
        p.stop();
        let after = ticks.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ticks.load(Ordering::SeqCst), after, "no tick after stop");

        // A nudge makes it tick before its period is up.
        let ticks = Arc::new(AtomicU32::new(0));
        let t = ticks.clone();
        let p = Periodic::start("test-nudge", Duration::from_secs(3600), move || {
            t.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        p.nudger().nudge();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ticks.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "a nudge did not make it tick");
            std::thread::sleep(Duration::from_millis(5));
        }
        p.stop();

        // A long period does not delay the stop.
        let slow = Periodic::start("test-slow", Duration::from_secs(3600), || {}).unwrap();
        let began = Instant::now();
        slow.stop();
        assert!(began.elapsed() < Duration::from_secs(1));
    }
}
