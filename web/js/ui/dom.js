/**
 * ui/dom.js — building elements safely. Text goes in as text nodes (never HTML), and
 * nothing sets a `style` attribute (the CSP forbids inline style): looks come from
 * classes in style.css.
 */

/**
 * `h('li', {class: 'msg', dataset: {id: 3}, onclick: fn}, 'text', child)`.
 * `text` sets textContent; `on<event>` adds a listener; other keys become attributes
 * (true → present, false/null → absent).
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c != null && c !== false) el.append(c);
  }
  return el;
}

export const $ = (id) => document.getElementById(id);

/** Shows a modal <dialog> (Escape closes it natively) and focuses `focus` in it. */
export function openDialog(dialog, focus) {
  if (!dialog.open) dialog.showModal();
  (focus ?? dialog.querySelector('input, button'))?.focus();
}

/** Asks a yes/no question in the confirm dialog; resolves true for OK. */
export function confirmAction(text, okLabel = 'OK') {
  const dialog = $('confirm-dialog');
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = okLabel;
  dialog.returnValue = '';
  openDialog(dialog, $('confirm-ok'));
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
  });
}

/** A visually hidden line for screen readers (the aria-live region). */
export function announce(text) {
  const live = $('live');
  live.append(h('p', { text }));
  while (live.childElementCount > 5) live.firstElementChild.remove();
}

let noticeTimer = null;
/** A short status line above the messages that goes away by itself. */
export function notice(text, ms = 6000) {
  const el = $('notice');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { el.hidden = true; }, ms);
}
