/**
 * state.js — what the page knows, with no DOM and no I/O.
 *
 * A conversation (`Conv`) is a joined room or a DM partner: its messages in id order
 * (deduplicated by id, so a replay after a reconnect or a history page that overlaps
 * live messages never shows one twice), the last and oldest ids (for `since` and
 * paging), unread count, and for rooms the set of online users.
 */

export class Conv {
  /** @param {'room'|'dm'} kind @param {string} id room name or partner's username */
  constructor(kind, id) {
    this.kind = kind;
    this.id = id;
    this.messages = [];
    this.byId = new Map();
    this.loaded = false; // the newest page of history is in
    this.hasOlder = true;
    this.loadingOlder = false;
    this.unread = 0;
    this.unreadFrom = null; // id of the oldest unread message
    this.online = new Set();
    this.last = null; // for DMs from /api/dms before the history is loaded
  }

  get key() { return `${this.kind}:${this.id}`; }
  /** The newest id seen (0 once an empty history has been loaded), or null. */
  get lastId() {
    if (this.messages.length) return this.messages[this.messages.length - 1].id;
    return this.loaded ? 0 : null;
  }
  get oldestId() { return this.messages.length ? this.messages[0].id : null; }

  /**
   * Merges messages in (a known id is skipped). Returns the ones added and how:
   * 'append' when they all sort after what was there, else 'reorder'.
   */
  add(msgs) {
    const before = this.messages.length ? this.messages[this.messages.length - 1].id : -Infinity;
    const added = [];
    for (const m of msgs) {
      const known = this.byId.get(m.id);
      if (known) {
        // a stand-in made from an ack gets the real event's fields
        if (known.local) Object.assign(known, m, { local: false });
        continue;
      }
      this.byId.set(m.id, m);
      this.messages.push(m);
      added.push(m);
    }
    let mode = 'append';
    if (added.some((m, i) => m.id < (i ? added[i - 1].id : before))) {
      this.messages.sort((a, b) => a.id - b.id);
      mode = 'reorder';
    }
    if (this.messages.length) this.last = this.messages[this.messages.length - 1];
    return { added, mode };
  }

  /** Counts `n` more unread messages, the oldest of them `fromId`. */
  markUnread(n, fromId) {
    if (!n) return;
    if (!this.unread) this.unreadFrom = fromId;
    this.unread += n;
  }

  markRead() {
    this.unread = 0;
    this.unreadFrom = null;
  }

  remove(id, me) {
    const m = this.byId.get(id);
    if (!m) return false;
    this.byId.delete(id);
    this.messages.splice(this.messages.indexOf(m), 1);
    if (this.unread && id >= this.unreadFrom && m.from !== me) this.unread--;
    if (this.last === m) this.last = this.messages[this.messages.length - 1] ?? null;
    return true;
  }
}

export const state = {
  /** the logged-in User */
  me: null,
  /** room name → Conv, for joined rooms, in the order joined */
  rooms: new Map(),
  /** partner username → Conv */
  dms: new Map(),
  /** room name → online count from the last GET /api/rooms */
  roomOnline: new Map(),
  /** {kind: 'room'|'dm'|'admin', id} */
  current: null,
  /** {from, body, ts} newest last */
  announcements: [],
  reset() {
    this.me = null;
    this.rooms.clear();
    this.dms.clear();
    this.roomOnline.clear();
    this.current = null;
    this.announcements = [];
  },
};

export function can(perm) {
  const roles = state.me?.roles ?? [];
  switch (perm) {
    case 'moderate': return roles.includes('admin') || roles.includes('moderator');
    case 'admin': return roles.includes('admin');
    default: return false;
  }
}

export function currentConv() {
  const c = state.current;
  if (!c) return null;
  if (c.kind === 'room') return state.rooms.get(c.id) ?? null;
  if (c.kind === 'dm') return state.dms.get(c.id) ?? null;
  return null;
}

export function totalUnread() {
  let n = 0;
  for (const c of state.rooms.values()) n += c.unread;
  for (const c of state.dms.values()) n += c.unread;
  return n;
}

/** Rooms to rejoin, saved per user in localStorage (names only, nothing secret). */
export function savedRooms(username) {
  try {
    const v = JSON.parse(localStorage.getItem(`parley.rooms.${username}`));
    if (Array.isArray(v) && v.every((x) => typeof x === 'string')) return v;
  } catch { /* none or unreadable */ }
  return ['general'];
}

export function saveRooms() {
  if (!state.me) return;
  try {
    localStorage.setItem(`parley.rooms.${state.me.username}`, JSON.stringify([...state.rooms.keys()]));
  } catch { /* storage may be off */ }
}
