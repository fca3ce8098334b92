//! Typed live events, for listeners that are not chat sockets: GraphQL subscriptions.
//!
//! A chat socket is handed pre-encoded frames by [`crate::fanout`]; a subscription
//! needs the event itself, to run its selection set on. So beside each broadcast frame
//! the actions publish a typed [`Event`] ([`crate::fanout::Fanout::publish`]), and the
//! fan-out thread, in commit order, pushes it onto the bounded queue of every
//! [`Listening`] registered for one of its [`Topic`]s. Pushing never waits: a listener
//! whose queue is full is closed and its socket dropped as too slow (1008), as a chat
//! socket whose backlog overflows is.
//!
//! Threads: the fan-out thread pushes; the listening socket's own thread takes, as a
//! `Stream` woken through its `Waker`. Nothing here has a thread of its own.

use crate::model::{Deleted, DirectMessage, Message, Presence};
use crate::peer::Peer;
use crate::sync::lock;
use futures_core::Stream;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

/// Something that happened, as listeners see it.
#[derive(Debug, Clone)]
pub enum Event {
    /// A room message was stored.
    Message(Arc<Message>),
    /// A room message was deleted.
    Deleted(Arc<Deleted>),
    /// A direct message was stored; it concerns both users (ids).
    Dm(Arc<DirectMessage>, [i64; 2]),
    /// Someone came online in a room or left it.
    Presence(Arc<Presence>),
}

/// What a listener listens to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// New messages of a room.
    Messages(String),
    /// Deletions in a room.
    Deletions(String),
    /// Presence changes in a room.
    Presence(String),
    /// Direct messages to or from a user.
    Dms(i64),
}

impl Event {
    /// The topics that hear this event.
    fn topics(&self) -> Vec<Topic> {
        match self {
            Event::Message(m) => vec![Topic::Messages(m.room.clone())],
            Event::Deleted(d) => vec![Topic::Deletions(d.room.clone())],
            Event::Presence(p) => vec![Topic::Presence(p.room.clone())],
            Event::Dm(_, [a, b]) if a == b => vec![Topic::Dms(*a)],
            Event::Dm(_, [a, b]) => vec![Topic::Dms(*a), Topic::Dms(*b)],
        }
    }
}

struct Inbox {
    events: VecDeque<Event>,
    waker: Option<Waker>,
    closed: bool,
}

/// One listener's bounded queue.
struct Queue {
    id: u64,
    inbox: Mutex<Inbox>,
    cap: usize,
    /// The socket to drop when the queue overflows.
    owner: Weak<Peer>,
}

/// Every listener, by topic.
#[derive(Default)]
pub struct Listeners {
    by_topic: Mutex<HashMap<Topic, Vec<Arc<Queue>>>>,
    /// How many are registered: publishing skips all work while there are none.
    count: AtomicUsize,
    next_id: AtomicUsize,
}

impl Listeners {
    /// Whether anyone listens at all.
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::SeqCst) == 0
    }

    /// Starts listening to `topic` with a queue of `cap` events; an overflow drops
    /// `owner` as too slow. Events published from now on are heard.
    pub fn listen(self: &Arc<Self>, topic: Topic, owner: Weak<Peer>, cap: usize) -> Listening {
        let queue = Arc::new(Queue {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) as u64,
            inbox: Mutex::new(Inbox {
                events: VecDeque::new(),
                waker: None,
                closed: false,
            }),
            cap: cap.max(1),
            owner,
        });
        let mut by_topic = lock(&self.by_topic);
        by_topic
            .entry(topic.clone())
            .or_default()
            .push(queue.clone());
        self.count.fetch_add(1, Ordering::SeqCst);
        drop(by_topic);
        Listening {
            queue,
            topic,
            listeners: self.clone(),
        }
    }

    fn unlisten(&self, topic: &Topic, id: u64) {
        let mut by_topic = lock(&self.by_topic);
        let Some(list) = by_topic.get_mut(topic) else {
            return;
        };
        let before = list.len();
        list.retain(|q| q.id != id);
        if list.len() < before {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        if list.is_empty() {
            by_topic.remove(topic);
        }
    }

    /// Pushes `event` to every listener of its topics, never waiting; returns the
    /// sockets whose listener overflowed (the caller drops them once it holds no
    /// lock).
    pub fn push(&self, event: &Event) -> Vec<Arc<Peer>> {
        let mut wake = Vec::new();
        let mut overflowed = Vec::new();
        {
            let by_topic = lock(&self.by_topic);
            for topic in event.topics() {
                for q in by_topic.get(&topic).into_iter().flatten() {
                    let mut inbox = lock(&q.inbox);
                    if inbox.closed {
                        continue;
                    }
                    if inbox.events.len() >= q.cap {
                        inbox.closed = true;
                        inbox.events.clear();
                        overflowed.extend(q.owner.upgrade());
                    } else {
                        inbox.events.push_back(event.clone());
                    }
                    wake.extend(inbox.waker.take());
                }
            }
        }
        wake.into_iter().for_each(Waker::wake);
        overflowed
    }
}

/// A registered listener: a stream of its topic's events, in publication order. It
/// ends when its queue overflowed; dropping it stops the listening.
pub struct Listening {
    queue: Arc<Queue>,
    topic: Topic,
    listeners: Arc<Listeners>,
}

impl Stream for Listening {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut inbox = lock(&self.queue.inbox);
        if let Some(e) = inbox.events.pop_front() {
            return Poll::Ready(Some(e));
        }
        if inbox.closed {
            return Poll::Ready(None);
        }
        inbox.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.listeners.unlisten(&self.topic, self.queue.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn message(id: i64, room: &str) -> Event {
        Event::Message(Arc::new(Message {
            id,
            room: room.into(),
            from: "a".into(),
            body: "b".into(),
            ts: "t".into(),
            client_id: None,
        }))
    }

    fn poll(l: &mut Listening) -> Poll<Option<Event>> {
        Pin::new(l).poll_next(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_listener_hears_its_topic_in_order_and_ends_when_it_overflows() {
        let all = Arc::new(Listeners::default());
        assert!(all.is_empty());
        let mut l = all.listen(Topic::Messages("r".into()), Weak::new(), 2);
        assert!(!all.is_empty());
        assert!(poll(&mut l).is_pending());
        all.push(&message(1, "other"));
        all.push(&message(2, "r"));
        assert!(matches!(poll(&mut l), Poll::Ready(Some(Event::Message(m))) if m.id == 2));
        assert!(poll(&mut l).is_pending());
        for id in 3..6 {
            all.push(&message(id, "r"));
        }
        // Three into a queue of two: closed, never blocked, the rest dropped.
        assert!(matches!(poll(&mut l), Poll::Ready(None)));
        drop(l);
        assert!(all.is_empty(), "dropping a listener unregisters it");
    }
}
