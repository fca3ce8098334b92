/**
 * socket.js — the chat WebSocket and everything that keeps it alive.
 *
 * - Connects to /ws with the subprotocols ["parley.v1", "bearer.<jwt>"] (the form a
 *   browser can send; the token never goes in the URL).
 * - On open, joins every room the page holds with "presence": "batch" and `since` =
 *   the last message id it saw, so a reconnect misses nothing; then resends every
 *   pending message.
 * - Pending sends: each `send`/`dm` carries a random `client_id` (also its `ref`) and
 *   stays in the outbox until acked or until its own broadcast comes back; after a
 *   reconnect it is sent again, and the server answers a repeat with the first
 *   message's ack, so nothing is doubled. The outbox is kept in the tab's
 *   sessionStorage under the user's name, so a reload (or a crash of the tab's page)
 *   while offline loses nothing; logging out drops it.
 * - Reconnects with exponential backoff and full jitter; a 4001 (expired) reconnects at
 *   once after a REST refresh; a 4003 asks the server (by refreshing) whether the user
 *   was banned or revoked, and a kick waits for the person to reconnect.
 * - Sends the socket's `refresh` whenever api.js gets a new access token.
 * - A ping every 25 s; no frame within 10 s after it drops the socket and reconnects.
 */
import * as api from './api.js';
import { closeReason, newClientId } from './format.js';

const BACKOFF_BASE = 500;
const BACKOFF_CAP = 15000;
const PING_EVERY = 25000;
const PONG_WAIT = 10000;
const RATE_RETRY = 1100;

export class ChatSocket {
  /**
   * @param {object} h
   * @param {() => {room: string, since: number|null}[]} h.rooms rooms to (re)join on open
   * @param {(frame: object) => void} h.onFrame every server frame but pong, refreshed and acks
   * @param {(state: object) => void} h.onState {status: connecting|connected|waiting|offline, retryAt, reason}
   * @param {() => void} h.onOutbox the outbox changed
   * @param {(pending: object, id: number) => void} h.onAck a pending message is stored as `id`
   */
  constructor(h) {
    this.h = h;
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.stopped = true;
    this.checkFirst = false;
    this.state = { status: 'offline', retryAt: 0, reason: '' };
    /** client_id → {clientId, kind: 'room'|'dm', target, body, ts, failed: string|null} */
    this.outbox = new Map();
    this.connecting = false;
    api.onToken((token) => this.send({ type: 'refresh', access_token: token, ref: 'refresh' }));
    addEventListener('online', () => this.reconnectNow());
    addEventListener('offline', () => {
      if (this.stopped) return;
      clearTimeout(this.timer);
      this.drop();
      this.setState({ status: 'offline', reason: 'this device is offline' });
    });
  }

  /** Connects as `username`, first taking back the messages a reload left pending. */
  start(username) {
    this.stopped = false;
    this.storeKey = `parley.outbox.${username}`;
    this.outbox = new Map(loadOutbox(this.storeKey).map((p) => [p.clientId, p]));
    if (this.outbox.size) this.h.onOutbox();
    this.connect();
  }

  /** Closes for good (logout); the outbox is dropped. */
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.drop();
    this.outbox.clear();
    try { if (this.storeKey) sessionStorage.removeItem(this.storeKey); } catch { /* storage may be off */ }
    this.storeKey = null;
    this.setState({ status: 'offline', reason: '' });
  }

  /** The outbox changed: keep it for a reload, and let the page show it. */
  changed() {
    try {
      if (this.storeKey) sessionStorage.setItem(this.storeKey, JSON.stringify([...this.outbox.values()]));
    } catch { /* storage may be off or full: the outbox still lives in memory */ }
    this.h.onOutbox();
  }

  isOpen() { return this.ws?.readyState === WebSocket.OPEN; }

  /** Sends one frame if the socket is open; returns whether it did. */
  send(frame) {
    if (!this.isOpen()) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  join(room, since) {
    const f = { type: 'join', room, presence: 'batch', ref: `join:${room}` };
    if (since != null) f.since = since;
    this.send(f);
  }

  /** Queues a room message or DM; it goes now if the socket is open, else on reconnect. */
  post(kind, target, body) {
    const p = { clientId: newClientId(), kind, target, body, ts: new Date().toISOString(), failed: null };
    this.outbox.set(p.clientId, p);
    this.transmit(p);
    this.changed();
    return p;
  }

  pendingFor(kind, target) {
    return [...this.outbox.values()].filter((p) => p.kind === kind && p.target === target);
  }

  retry(clientId) {
    const p = this.outbox.get(clientId);
    if (!p) return;
    p.failed = null;
    this.transmit(p);
    this.changed();
  }

  discard(clientId) {
    if (this.outbox.delete(clientId)) this.changed();
  }

  /** A broadcast of our own message came back: it is stored, stop waiting. */
  settle(clientId) {
    if (clientId && this.outbox.delete(clientId)) this.changed();
  }

  /** Skips the wait (the "Reconnect now" button). */
  reconnectNow() {
    if (this.stopped || this.ws) return;
    this.attempt = 0;
    this.connect();
  }

  transmit(p) {
    const f = p.kind === 'room'
      ? { type: 'send', room: p.target, body: p.body }
      : { type: 'dm', to: p.target, body: p.body };
    f.ref = p.clientId;
    f.client_id = p.clientId;
    this.send(f);
  }

  setState(s) {
    this.state = { retryAt: 0, reason: this.state.reason, ...s };
    this.h.onState(this.state);
  }

  async connect() {
    clearTimeout(this.timer);
    if (this.stopped || this.ws || this.connecting) return;
    this.connecting = true;
    try {
      await this.open();
    } finally {
      this.connecting = false;
    }
  }

  async open() {
    if (!navigator.onLine) {
      this.setState({ status: 'offline', reason: 'this device is offline' });
      return;
    }
    this.setState({ status: 'connecting' });
    // A token about to expire, or a refused upgrade last time (it may mean a ban or a
    // revoked login, which only the refresh answer tells): refresh first.
    if ((this.checkFirst || api.tokenLeft() < 5000) && !(await this.refreshed())) return;
    if (this.stopped) return;
    this.checkFirst = false;
    const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
    let ws;
    try {
      ws = new WebSocket(url, ['parley.v1', `bearer.${api.token()}`]);
    } catch {
      this.schedule();
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.attempt = 0;
      this.setState({ status: 'connected', reason: '' });
      for (const { room, since } of this.h.rooms()) this.join(room, since);
      for (const p of this.outbox.values()) if (!p.failed) this.transmit(p);
      this.armPing();
    };
    ws.onmessage = (ev) => this.receive(ev);
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.closed(ev.code, ev.reason, opened);
    };
  }

  receive(ev) {
    this.armPing();
    let f;
    try { f = JSON.parse(ev.data); } catch { return; }
    if (f.type === 'pong' || f.type === 'refreshed') return;
    if (f.type === 'error' && f.ref === 'refresh') {
      // The socket kept its old token; start over with a fresh one rather than be cut at expiry.
      this.drop();
      this.closed(4001, '', true);
      return;
    }
    if (f.type === 'ack') {
      const p = this.outbox.get(f.ref);
      if (p) {
        this.outbox.delete(f.ref);
        this.h.onAck(p, f.id);
        this.changed();
      }
      return;
    }
    if (f.type === 'error' && f.ref && this.outbox.has(f.ref)) {
      const p = this.outbox.get(f.ref);
      if (f.code === 'rate_limited') {
        setTimeout(() => { if (this.outbox.get(p.clientId) === p && !p.failed) this.transmit(p); }, RATE_RETRY);
        return;
      }
      p.failed = f.code === 'too_large'
        ? 'too long (at most 4000 characters)'
        : f.message || f.code;
      this.changed();
      return;
    }
    this.h.onFrame(f);
  }

  /** Ping after a quiet spell; a socket that answers nothing is dropped. */
  armPing() {
    clearTimeout(this.pingTimer);
    clearTimeout(this.pongTimer);
    this.pingTimer = setTimeout(() => {
      if (!this.send({ type: 'ping' })) return;
      this.pongTimer = setTimeout(() => {
        const ws = this.ws;
        this.drop();
        if (ws) this.closed(4000, '', true);
      }, PONG_WAIT);
    }, PING_EVERY);
  }

  /** Forgets the socket at once, without waiting for a close handshake. */
  drop() {
    clearTimeout(this.pingTimer);
    clearTimeout(this.pongTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      try { ws.close(); } catch { /* already closing */ }
    }
  }

  async closed(code, reason, opened) {
    clearTimeout(this.pingTimer);
    clearTimeout(this.pongTimer);
    if (this.stopped) return;
    const words = opened ? closeReason(code, reason) : 'cannot connect to the server';
    this.setState({ status: 'connecting', reason: words });
    if (code === 4003) {
      // Kicked, banned or revoked: the refresh answer says which.
      if (!(await this.refreshed())) return;
      if (reason === 'kicked') {
        this.setState({ status: 'offline', reason: words });
        return;
      }
      this.attempt = 0;
      this.connect();
      return;
    }
    if (code === 4001) {
      this.attempt = 0;
      this.checkFirst = true;
      this.connect();
      return;
    }
    if (!opened) this.checkFirst = true;
    this.schedule();
  }

  /**
   * A REST refresh; false when it failed. A refusal ends the session (api.js tells the
   * page); no answer schedules the next attempt.
   */
  async refreshed() {
    try {
      await api.refresh();
      return true;
    } catch (e) {
      if (e.status !== 401 && e.status !== 403) this.schedule();
      return false;
    }
  }

  schedule() {
    if (this.stopped) return;
    const delay = Math.min(BACKOFF_CAP, BACKOFF_BASE * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt = Math.min(this.attempt + 1, 10);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay);
    this.setState({ status: 'waiting', retryAt: Date.now() + delay });
  }
}

/** The pending messages saved under `key`, keeping only well-formed ones. */
function loadOutbox(key) {
  let v;
  try { v = JSON.parse(sessionStorage.getItem(key)); } catch { return []; }
  if (!Array.isArray(v)) return [];
  const str = (x) => typeof x === 'string';
  return v.filter((p) => p && str(p.clientId) && (p.kind === 'room' || p.kind === 'dm')
    && str(p.target) && str(p.body) && str(p.ts) && (p.failed === null || str(p.failed)));
}
