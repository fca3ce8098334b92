//! Changes made by other nodes, delivered to this node's sockets.
//!
//! Several parley nodes can share one PostgreSQL database behind a load balancer;
//! each holds its own sockets. What one node commits, the others hear as
//! [`Notice`]s from the store ([`crate::store::notice`]), and [`sink`] hands each to
//! the same delivery code the node's own actions use, so a message from a socket on
//! node A reaches the room's sockets on B exactly as if it were sent there. Bans,
//! revocations and role changes need no notice: permissions are read from the
//! database on every action, and `enforce`'s sweep sees the login changes of every
//! node. On SQLite there is one node and no notice ever comes.
//!
//! Threads: the sink runs on the store's listening thread (started by
//! [`crate::server`] through [`crate::store::Store::listen`], stopped by
//! `Store::close`). It only queues deliveries (the fan-out thread writes them) or
//! closes sockets, so it never waits on a client.

use crate::actions::{
    broadcast_deleted, broadcast_dm, broadcast_message, close_kicked, deliver_announcement,
};
use crate::app::App;
use crate::store::notice::{Notice, Sink};
use std::sync::Weak;

/// The sink for other nodes' notices. It holds the app weakly: the store, which the
/// app owns, holds the sink.
pub fn sink(app: Weak<App>) -> Sink {
    Box::new(move |notice| {
        if let Some(app) = app.upgrade() {
            apply(&app, notice);
        }
    })
}

/// Delivers one notice to this node's sockets.
fn apply(app: &App, notice: Notice) {
    match notice {
        Notice::Message { message } => broadcast_message(app, &message),
        Notice::Dm { dm, users } => broadcast_dm(app, &dm, users),
        Notice::Deleted { deleted } => broadcast_deleted(app, deleted),
        Notice::Kick { user_id } => {
            close_kicked(app, user_id);
        }
        Notice::Announce { frame, roles } => {
            if let Err(e) = deliver_announcement(app, &frame, roles.as_deref()) {
                log::warn!("an announcement from another node was not delivered: {e}");
            }
        }
    }
}
