/**
 * ui/status.js — the connection state in the top bar: connected, connecting,
 * reconnecting in N s (counting down) or offline, with why the last socket closed.
 */
import { $, announce } from './dom.js';

let ticker = null;
let last = null;

export function initStatus({ onRetry }) {
  $('conn-retry').addEventListener('click', onRetry);
}

function text(s) {
  const why = s.reason ? ` — ${s.reason}` : '';
  switch (s.status) {
    case 'connected': return 'Connected';
    case 'connecting': return `Connecting…${why}`;
    case 'waiting': {
      const secs = Math.max(0, Math.ceil((s.retryAt - Date.now()) / 1000));
      return `Reconnecting in ${secs} s${why}`;
    }
    default: return `Offline${why}`;
  }
}

export function renderStatus(s) {
  // Screen readers hear a change of state once, not the countdown every second.
  if (last && (last.status !== s.status || last.reason !== s.reason) && s.status !== 'connecting') announce(text(s));
  last = s;
  const el = $('conn');
  el.dataset.status = s.status;
  $('conn-text').textContent = text(s);
  $('conn-retry').hidden = !(s.status === 'waiting' || s.status === 'offline');
  clearInterval(ticker);
  if (s.status === 'waiting') {
    ticker = setInterval(() => { $('conn-text').textContent = text(last); }, 1000);
  }
}
