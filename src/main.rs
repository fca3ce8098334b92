//! parley: a small, secure, self-hosted chat server — one binary, one SQLite file.
//!
//! `main` only wires the modules together. Where to look:
//! [`cli`] and [`config`] (flags into one validated `Config`), [`check`] (the health
//! report), [`server`] (starts and stops every service), [`front`] (the accept loop,
//! watched and restarted, and the HTTP workers), [`http`] (routes), [`exchange`]
//! (which thread reads a request and writes its answer, so no worker waits on a
//! client), [`conns`] (plain HTTP connections: turns, deadlines), [`lane`] (IO
//! threads), [`request`] (reading requests, writing answers), [`cookie`] (the web
//! client's refresh cookie), [`ws`] (one socket's life), [`web`] (the built-in web
//! client), [`hub`] (rooms and presence), [`fanout`]
//! (delivery of committed events), [`peer`] (non-blocking writes to one socket),
//! [`presence`] (batched presence), [`keepalive`] (pings for silent sockets), [`enforce`] (token expiry and revocation on live sockets), [`reaper`] (idle HTTP
//! connections), [`limits`] (rate limits, the password threads), [`actions`] (what users
//! can do, shared by every transport), [`cluster`] (other nodes' changes, on PostgreSQL), [`auth`] (passwords and tokens), [`store`] (all
//! SQL), [`protocol`] and [`model`] (wire types), [`error`] (error codes), [`metrics`],
//! [`clock`], [`logging`], [`random`] (OS randomness), [`service`] (background threads' lifecycle), [`sync`] (the
//! lock policy), and [`sys`] (the one module allowed `unsafe`).
#![deny(unsafe_code)]
#![warn(missing_docs)]
// On Linux with glibc the process starts in `sys::main`, not in the standard
// library's runtime, which would give every thread a signal stack (see there).
#![cfg_attr(all(target_os = "linux", target_env = "gnu", not(test)), no_main)]

mod actions;
mod app;
mod auth;
mod check;
mod cli;
mod clock;
mod cluster;
mod config;
mod conns;
mod cookie;
mod enforce;
mod error;
mod events;
mod exchange;
mod fanout;
mod front;
mod graphql;
mod heartbeat;
mod http;
mod hub;
mod keepalive;
mod lane;
mod limits;
mod logging;
mod metrics;
mod model;
mod online;
mod peer;
mod presence;
mod protocol;
mod random;
mod reaper;
mod request;
mod server;
mod service;
mod store;
mod sync;
mod sys;
mod web;
mod ws;

use clap::Parser;

/// The program on every platform: the process's exit code.
fn run() -> i32 {
    // Small stacks for tiny_http's per-connection threads (one per HTTP connection);
    // set before any thread starts, since the standard library reads it once.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", "131072");
    }
    logging::init();
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("parley: {e}");
            e.exit_code()
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(test))))]
fn main() {
    std::process::exit(run());
}
