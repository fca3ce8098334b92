/**
 * ui/auth.js — the login / register screen. Every refusal is said in words
 * (format.authError); the form checks names and passwords locally first.
 */
import { $ } from './dom.js';
import { authError } from '../format.js';
import * as api from '../api.js';

const NAME = /^[A-Za-z0-9_.-]{3,32}$/;

let busy = false;

/** Shows the screen, with `message` (why the user is here) if any. */
export function showAuth(message = '') {
  $('app-view').hidden = true;
  $('boot').hidden = true;
  $('auth-view').hidden = false;
  $('auth-error').textContent = message;
  $('auth-password').value = '';
  $('auth-username').focus();
}

function localCheck(username, password) {
  if (!NAME.test(username)) return 'A username is 3–32 characters: letters, digits, _ . or -.';
  const bytes = new TextEncoder().encode(password).length;
  if (bytes < 8) return 'A password has at least 8 characters.';
  if (bytes > 72) return 'That password is too long (at most 72 bytes).';
  return '';
}

/** @param {(user) => void} onLoggedIn */
export function initAuth(onLoggedIn) {
  const form = $('auth-form');
  const run = async (registering) => {
    if (busy) return;
    const username = $('auth-username').value.trim();
    const password = $('auth-password').value;
    const problem = localCheck(username, password);
    const err = $('auth-error');
    if (problem) {
      err.textContent = problem;
      return;
    }
    busy = true;
    err.textContent = registering ? 'Creating your account…' : 'Logging in…';
    try {
      if (registering) await api.register(username, password);
      const user = await api.login(username, password);
      err.textContent = '';
      $('auth-password').value = '';
      onLoggedIn(user);
    } catch (e) {
      err.textContent = authError(e, registering);
    } finally {
      busy = false;
    }
  };
  form.addEventListener('submit', (e) => { e.preventDefault(); run(false); });
  $('register-btn').addEventListener('click', () => run(true));
}
