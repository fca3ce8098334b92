// parley's GraphQL endpoint driven by stock clients, with nothing parley-specific:
// graphql-js for introspection and validation (what codegen tools do), plain fetch for
// queries and mutations, and graphql-ws (over the `ws` package, Node 20) for
// subscriptions. The token goes in the URL or a header, never in connection_init.
//
// Runs the real server: PARLEY_BIN (default ../../target/debug/parley, built by
// `cargo test`) on a fresh database in a temporary directory.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  buildClientSchema, buildSchema, getIntrospectionQuery, lexicographicSortSchema,
  parse, printSchema, validate,
} from 'graphql';
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.env.PARLEY_BIN ?? join(here, '..', '..', 'target', 'debug', 'parley');
let server, dir, base, admin, bob;

async function start() {
  dir = mkdtempSync(join(tmpdir(), 'parley-gql-client-'));
  server = spawn(bin, [
    'serve', '--addr', '127.0.0.1:0', '--db', join(dir, 'chat.db'),
    '--bcrypt-cost', '4', '--login-rate', '0', '--msg-rate', '0',
  ], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, RUST_LOG: 'error' } });
  let timer;
  const line = await new Promise((resolve, reject) => {
    let out = '';
    server.stdout.on('data', (chunk) => {
      out += chunk;
      const nl = out.indexOf('\n');
      if (nl >= 0) resolve(out.slice(0, nl));
    });
    server.on('exit', (code) => reject(new Error(`parley exited with ${code}`)));
    timer = setTimeout(() => reject(new Error('parley did not start')), 30_000);
  }).finally(() => clearTimeout(timer));
  const port = /127\.0\.0\.1:(\d+)/.exec(line)[1];
  base = `127.0.0.1:${port}`;
}

async function json(path, body, token) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const r = await fetch(`http://${base}${path}`, { method: 'POST', headers, body: JSON.stringify(body) });
  return { status: r.status, body: await r.json() };
}

async function account(name) {
  await json('/api/register', { username: name, password: 'correct horse battery' });
  const r = await json('/api/login', { username: name, password: 'correct horse battery' });
  assert.equal(r.status, 200);
  return r.body.access_token;
}

const gql = (token, query, variables) => json('/graphql', { query, variables }, token);

// A graphql-ws client with the token in the URL (the form browsers can use too).
function wsClient(token) {
  return createClient({
    url: `ws://${base}/graphql?access_token=${encodeURIComponent(token)}`,
    webSocketImpl: WebSocket,
    retryAttempts: 0,
    lazy: true,
  });
}

before(async () => {
  await start();
  admin = await account('admin');
  bob = await account('bob');
});

after(() => {
  server?.kill('SIGKILL');
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('introspection gives graphql-js the committed schema', async () => {
  const r = await gql(bob, getIntrospectionQuery());
  assert.equal(r.status, 200);
  assert.equal(r.body.errors, undefined, JSON.stringify(r.body.errors));
  const live = lexicographicSortSchema(buildClientSchema(r.body.data));
  const committed = lexicographicSortSchema(
    buildSchema(readFileSync(join(here, '..', '..', 'schema.graphql'), 'utf8')),
  );
  assert.equal(printSchema(live), printSchema(committed));
  for (const t of ['Query', 'Mutation', 'Subscription']) assert.ok(live.getType(t), t);
  const doc = parse('query($r: String!) { messages(room: $r, limit: 5) { id from body ts clientId } }');
  assert.deepEqual(validate(live, doc), []);
});

test('queries and mutations over fetch, errors with extensions.code', async () => {
  const me = await gql(bob, '{ me { username roles } }');
  assert.deepEqual(me.body.data.me, { username: 'bob', roles: ['member'] });
  const sent = await gql(bob, 'mutation($b: String!) { sendMessage(room: "general", body: $b) { id from body } }', { b: 'from fetch' });
  assert.equal(sent.body.data.sendMessage.body, 'from fetch');
  const denied = await gql(bob, '{ auditLog { id } }');
  assert.equal(denied.status, 200);
  assert.equal(denied.body.errors[0].extensions.code, 'forbidden');
});

test('graphql-ws: messageAdded replays after `since`, then goes live', async () => {
  const first = await gql(admin, 'mutation { sendMessage(room: "general", body: "stored") { id } }');
  const since = first.body.data.sendMessage.id - 1;
  const client = wsClient(bob);
  const sub = client.iterate({
    query: 'subscription($s: Int) { messageAdded(room: "general", since: $s) { id from body } }',
    variables: { s: since },
  });
  const replayed = await sub.next();
  assert.equal(replayed.value.data.messageAdded.body, 'stored');
  await gql(admin, 'mutation { sendMessage(room: "general", body: "live") { id } }');
  const live = await sub.next();
  assert.equal(live.value.data.messageAdded.body, 'live');
  assert.equal(live.value.data.messageAdded.from, 'admin');
  await sub.return();
  await client.dispose();
});

test('graphql-ws with the token in a header: dmReceived, and an unknown room refused', async () => {
  class WithToken extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, { headers: { Authorization: `Bearer ${bob}` } });
    }
  }
  const client = createClient({ url: `ws://${base}/graphql`, webSocketImpl: WithToken, retryAttempts: 0 });
  const dms = client.iterate({ query: 'subscription { dmReceived { from to body } }' });
  // The subscription is registered once the server answered something on the socket:
  // wait for a ping round trip before sending.
  await new Promise((resolve, reject) => {
    const probe = client.iterate({ query: 'query { me { username } }' });
    probe.next().then(resolve, reject);
  });
  await gql(admin, 'mutation { sendDm(to: "bob", body: "psst") { id } }');
  const dm = await dms.next();
  assert.deepEqual(dm.value.data.dmReceived, { from: 'admin', to: 'bob', body: 'psst' });
  await dms.return();
  await assert.rejects(
    client.iterate({ query: 'subscription { messageAdded(room: "nowhere") { id } }' }).next(),
    (errors) => errors[0]?.extensions?.code === 'not_found',
  );
  await client.dispose();
});
