//! Delivery of committed events (messages, direct messages, deletions, acks) in commit
//! order, on their own thread, coalesced per socket.
//!
//! The store's completion thread hands each committed event here and goes on. The
//! `fanout` thread takes everything queued, queues every frame on every recipient
//! socket (under the hub's room lock: a queue push, no system call), then, with no
//! lock held, drops the sockets whose queue overflowed and writes each touched socket
//! once: when messages arrive faster than they can be sent, several leave in one
//! system call, so the cost per delivery falls as load rises instead of latency
//! climbing. Typed [`Event`]s for GraphQL subscriptions ([`crate::events`]) take the
//! same queue and thread, so they too go out in commit order and never wait on a slow
//! listener. [`Fanout::stop`] (at shutdown, after a final [`Fanout::sync`]) closes the
//! queue and joins the thread.

use crate::events::{Event, Listeners, Listening, Topic};
use crate::hub::{Hub, PresenceMode};
use crate::peer::{Frame, Handed, Peer};
use crate::service::{Worker, SERVICE_STACK};
use crate::sync::lock;
use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Who receives a frame.
pub enum Target {
    /// Every socket in a room; `id` marks a stored message (for replay de-duplication).
    Room {
        /// Room name.
        name: String,
        /// Message id, for room messages only.
        id: Option<i64>,
    },
    /// These sockets (presence, addressed to who was in the room at that moment).
    Peers(Vec<Arc<Peer>>),
    /// Every chat socket of a user.
    User(i64),
    /// The sockets of a room that hear presence in one way (batches, counts).
    Takers {
        /// Room name.
        room: String,
        /// Which way.
        mode: PresenceMode,
    },
    /// One socket.
    Peer(Arc<Peer>),
}

type Delivery = Vec<(Target, Frame)>;

enum Item {
    Deliver(Delivery),
    Publish(Event),
    /// Answered once everything queued before it has been written out.
    Sync(SyncSender<()>),
}

/// Most deliveries waiting for the fan-out thread. Past it, whoever delivers waits
/// (the completion thread, the presence thread, a socket reporting presence): the
/// fan-out thread never waits on them, it only writes without blocking.
pub const QUEUE_CAP: usize = 65_536;

/// Most deliveries coalesced in one pass.
const MAX_PASS: usize = 512;

/// Handle to the fan-out thread.
pub struct Fanout {
    tx: Mutex<Option<SyncSender<Item>>>,
    listeners: Arc<Listeners>,
    worker: Worker,
}

impl Fanout {
    /// Starts the fan-out thread.
    pub fn start(hub: Arc<Hub>) -> std::io::Result<Fanout> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAP);
        let listeners = Arc::new(Listeners::default());
        let l = listeners.clone();
        let worker = Worker::spawn("fanout", SERVICE_STACK, move || run(&hub, &l, &rx))?;
        Ok(Fanout {
            tx: Mutex::new(Some(tx)),
            listeners,
            worker,
        })
    }

    /// Delivers what is queued, then stops the thread and joins it; later deliveries
    /// are dropped.
    pub fn stop(&self) {
        lock(&self.tx).take();
        self.worker.join();
    }

    /// Queues frames for delivery, in order after everything queued before.
    pub fn deliver(&self, delivery: Delivery) {
        self.send(Item::Deliver(delivery));
    }

    /// Publishes a typed event to its listeners, in order after everything queued
    /// before. While nobody listens (no GraphQL subscription) the event is not even
    /// made: `event` runs only when someone may hear it.
    pub fn publish(&self, event: impl FnOnce() -> Event) {
        if !self.listeners.is_empty() {
            self.send(Item::Publish(event()));
        }
    }

    /// Starts listening to `topic` (see [`Listeners::listen`]).
    pub fn listen(&self, topic: Topic, owner: &Arc<Peer>, cap: usize) -> Listening {
        self.listeners.listen(topic, Arc::downgrade(owner), cap)
    }

    /// Waits until everything queued so far has been handed to its sockets.
    pub fn sync(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Item::Sync(tx));
        let _ = rx.recv();
    }

    fn send(&self, item: Item) {
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(item);
        }
    }
}

fn run(hub: &Hub, listeners: &Listeners, rx: &Receiver<Item>) {
    while let Ok(first) = rx.recv() {
        let mut pass = vec![first];
        while pass.len() < MAX_PASS {
            match rx.try_recv() {
                Ok(more) => pass.push(more),
                Err(_) => break,
            }
        }
        let mut touched = Touched::default();
        let mut synced = Vec::new();
        for item in pass {
            match item {
                Item::Deliver(d) => {
                    for (target, frame) in d {
                        queue(hub, &target, &frame, &mut touched);
                    }
                }
                Item::Publish(e) => {
                    for p in listeners.push(&e) {
                        touched.overflowed.entry(p.id).or_insert(p);
                    }
                }
                Item::Sync(done) => synced.push(done),
            }
        }
        for peer in touched.overflowed.values() {
            peer.drop_slow();
        }
        for peer in touched.written.values() {
            peer.flush();
        }
        for done in synced {
            let _ = done.send(());
        }
    }
}

/// The sockets one pass queued frames on, and those whose queue overflowed.
#[derive(Default)]
struct Touched {
    written: HashMap<u64, Arc<Peer>>,
    overflowed: HashMap<u64, Arc<Peer>>,
}

fn queue(hub: &Hub, target: &Target, frame: &Frame, touched: &mut Touched) {
    let mut put = |p: &Arc<Peer>, room_msg: Option<(&str, i64)>| {
        let into = match p.queue(frame, room_msg) {
            Handed::Queued => &mut touched.written,
            Handed::Overflow => &mut touched.overflowed,
            Handed::Closed => return,
        };
        into.entry(p.id).or_insert_with(|| p.clone());
    };
    match target {
        Target::Room { name, id } => {
            hub.for_each_in_room(name, |p| put(p, id.map(|id| (name.as_str(), id))));
        }
        Target::Takers { room, mode } => hub.for_each_taker(room, *mode, |p| put(p, None)),
        Target::Peers(peers) => peers.iter().for_each(|p| put(p, None)),
        Target::User(user_id) => {
            for p in hub.user_peers(*user_id).iter().filter(|p| p.speaks_chat()) {
                put(p, None);
            }
        }
        Target::Peer(p) => put(p, None),
    }
}
