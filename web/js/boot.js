/**
 * boot.js — a classic script that runs before the modules: if the module graph cannot
 * be fetched (a network error mid-load), or the app has not started after 20 s, the
 * "Loading…" line becomes a message with a Reload button instead of hanging silently.
 * app.js sets `document.documentElement.dataset.started` when it runs.
 */
(function watchBoot() {
  function stuck(text) {
    if (document.documentElement.dataset.started) return;
    var boot = document.getElementById('boot');
    if (!boot) return;
    boot.textContent = text + ' ';
    var again = document.createElement('button');
    again.textContent = 'Reload';
    again.addEventListener('click', function reload() { location.reload(); });
    boot.appendChild(again);
  }
  // A script's error event does not bubble, but it can be caught on the way down.
  window.addEventListener('error', function failed(e) {
    if (e.target && e.target.tagName === 'SCRIPT') stuck('parley could not load: the connection failed.');
  }, true);
  setTimeout(function slow() { stuck('parley is taking long to load.'); }, 20000);
}());
