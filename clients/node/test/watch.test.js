'use strict';

// watchToken() against a real agent, and the watch-backed cache
// (new Client({ watch: true })). Key rotations (a new key file and SIGHUP)
// make the agent push a new token at once, so nothing here waits for a
// refresh point.

const assert = require('node:assert/strict');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { describe, it, before, after, mock } = require('node:test');

const {
  Client,
  Token,
  TokenWatch,
  SkykitAgentError,
  AgentShuttingDownError,
  AgentUnreachableError,
  InvalidArgumentError,
  NotFoundError,
  UnavailableError,
} = require('..');
const { PUSH_GRACE_MS } = require('../lib/client');
const { BACKOFF } = require('../lib/watch');
const { startAgent, verifyToken, verifyTokenObject, callCounter, tempDir, sleep } = require('./helpers');

/** How long a token the agent pushes may take to arrive. */
const PUSH_DEADLINE_MS = 10_000;

/** watch.next(), failing (and closing the watch) if nothing comes in time. */
async function take(watch, ms = PUSH_DEADLINE_MS) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => {
      watch.close();
      reject(new Error(`no token from the watch within ${ms} ms`));
    }, ms);
  });
  try {
    const step = await Promise.race([watch.next(), late]);
    assert.equal(step.done, false, 'the watch ended instead of giving a token');
    return step.value;
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `check` until it returns a truthy value. */
async function eventually(check, what, ms = PUSH_DEADLINE_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(10);
  }
}

/** Shorter reconnect pauses (20 ms on) for the duration of a test. */
function fastBackoff(t) {
  const first = BACKOFF.firstMs;
  BACKOFF.firstMs = 20;
  t.after(() => {
    BACKOFF.firstMs = first;
  });
}

// One agent for the tests that do not stop it (rotations change its key:
// agent.publicKey follows); each test closes its watches before the next.
let agent;

before(async () => {
  agent = await startAgent();
});

after(async () => {
  if (agent) await agent.cleanup();
});

describe('watchToken', () => {
  it('sends the current token at once, verified, the one getToken gets', async (t) => {
    const client = new Client({ socket: agent.socket });
    t.after(() => client.close());
    const cached = await client.getToken({ lifetime: 800 });
    const started = Date.now();
    const watch = client.watchToken({ lifetime: 800 });
    assert.ok(watch instanceof TokenWatch);
    const token = await take(watch);
    assert.ok(Date.now() - started < 2_000, 'the first token comes at once');
    assert.ok(token instanceof Token);
    verifyTokenObject(token, agent.publicKey, { lifetime: 800 });
    assert.equal(token.token, cached.token, "the agent's cache entry of (default, 800 s)");
    await watch.return();
    assert.equal(watch.closed, true);
  });

  it('takes identity and lifetime', async (t) => {
    const client = new Client({ socket: agent.socket });
    t.after(() => client.close());
    for await (const token of client.watchToken({ identity: 'default', lifetime: 900 })) {
      verifyTokenObject(token, agent.publicKey, { lifetime: 900 });
      break;
    }
  });

  it('rejects like getToken: unknown identity, bad lifetime, no agent, closed client', async (t) => {
    const client = new Client({ socket: agent.socket });
    t.after(() => client.close());
    await assert.rejects(client.watchToken({ identity: 'nope' }).next(), (error) => {
      assert.ok(error instanceof NotFoundError, String(error));
      assert.equal(error.code, 'NOT_FOUND');
      assert.match(error.message, /unknown identity "nope"/);
      return true;
    });
    for (const lifetime of [59, 3601]) {
      const watch = client.watchToken({ lifetime });
      await assert.rejects(watch.next(), (error) => {
        assert.ok(error instanceof InvalidArgumentError, String(error));
        assert.match(error.message, new RegExp(`${lifetime}s`));
        return true;
      });
      assert.equal(watch.closed, true);
      assert.deepEqual(await watch.next(), { done: true, value: undefined });
    }
    assert.throws(() => client.watchToken({ lifetime: '600s' }), TypeError);
    assert.throws(() => client.watchToken({ identity: 7 }), TypeError);

    const dir = tempDir();
    t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
    const nowhere = new Client({ socket: path.join(dir, 'none.sock') });
    await assert.rejects(nowhere.watchToken().next(), (error) => {
      assert.ok(error instanceof AgentUnreachableError, String(error));
      assert.equal(error.attempts[0].reason, 'does not exist');
      return true;
    });

    const closed = new Client({ socket: agent.socket });
    closed.close();
    await assert.rejects(closed.watchToken().next(), (error) => {
      assert.ok(error instanceof SkykitAgentError);
      assert.match(error.message, /closed/);
      return true;
    });
    await agent.waitForWatchers(0);
  });

  it('waits for the first token at most timeoutMs (a hung agent)', async (t) => {
    // A socket that accepts connections but never answers.
    const dir = tempDir();
    const sockets = [];
    const server = net.createServer((socket) => sockets.push(socket));
    await new Promise((resolve) => server.listen(path.join(dir, 'silent.sock'), resolve));
    t.after(async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
      fs.rmSync(dir, { recursive: true, force: true });
    });
    const client = new Client({ socket: path.join(dir, 'silent.sock'), timeoutMs: 300 });
    t.after(() => client.close());
    const watch = client.watchToken();
    const started = Date.now();
    await assert.rejects(watch.next(), (error) => {
      assert.ok(error instanceof SkykitAgentError, String(error));
      assert.equal(error.code, 'DEADLINE_EXCEEDED');
      assert.match(error.message, /no token from the agent within 300 ms/);
      return true;
    });
    assert.ok(Date.now() - started >= 250);
    assert.equal(watch.closed, true);
  });

  it('pushes a token from the new key right after a key rotation (SIGHUP)', async (t) => {
    const own = agent;
    await own.waitForWatchers(0);
    const client = new Client({ socket: own.socket });
    t.after(() => client.close());
    const oldKey = own.publicKey;
    const watch = client.watchToken({ lifetime: 600 });
    const first = await take(watch);
    verifyTokenObject(first, oldKey, { lifetime: 600 });
    const newKey = own.rotate();
    const started = Date.now();
    const rotated = await take(watch);
    assert.ok(Date.now() - started < 5_000);
    verifyTokenObject(rotated, newKey, { lifetime: 600 });
    assert.throws(() => verifyToken(rotated.token, oldKey, { lifetime: 600 }));
    assert.notEqual(rotated.keyId, first.keyId);
    watch.close();
  });

  it('gives several watchers the same token, from one signer', async (t) => {
    const own = agent;
    await own.waitForWatchers(0);
    const one = new Client({ socket: own.socket });
    const other = new Client({ socket: own.socket });
    t.after(() => {
      one.close();
      other.close();
    });
    const watches = [0, 1, 2].map(() => one.watchToken({ lifetime: 700 }));
    watches.push(other.watchToken({ lifetime: 700 }));
    const firsts = new Set((await Promise.all(watches.map((w) => take(w)))).map((token) => token.token));
    assert.equal(firsts.size, 1);
    await own.waitForWatchers(4);
    await eventually(async () => (await own.status()).refreshers === 1, 'one refresher for the one entry');
    const newKey = own.rotate();
    const rotated = new Set((await Promise.all(watches.map((w) => take(w)))).map((token) => token.token));
    assert.equal(rotated.size, 1);
    const [token] = rotated;
    assert.ok(!firsts.has(token));
    verifyToken(token, newKey, { lifetime: 700 });
    for (const watch of watches) watch.close();
    await own.waitForWatchers(0);
  });

  it('closes the stream on break, return() and close(); client.close() ends a pending next()', async (t) => {
    const own = agent;
    await own.waitForWatchers(0);
    const client = new Client({ socket: own.socket });
    t.after(() => client.close());

    // Nothing is sent before the first next().
    const idle = client.watchToken();
    await own.waitForWatchers(0);

    for await (const token of client.watchToken()) {
      verifyTokenObject(token, own.publicKey);
      await own.waitForWatchers(1);
      break;
    }
    await own.waitForWatchers(0);

    const returned = client.watchToken({ lifetime: 600 });
    await take(returned);
    const explicit = client.watchToken();
    await take(explicit);
    await own.waitForWatchers(2);
    assert.deepEqual(await returned.return(), { done: true, value: undefined });
    await own.waitForWatchers(1);
    explicit.close();
    await own.waitForWatchers(0);
    assert.deepEqual(await explicit.next(), { done: true, value: undefined });

    // A next() waiting for the agent's next token ends with done when the
    // watch or its client is closed.
    const waiting = client.watchToken();
    await take(waiting);
    const pending = waiting.next();
    await own.waitForWatchers(1);
    waiting.close();
    assert.deepEqual(await pending, { done: true, value: undefined });

    const last = client.watchToken();
    await take(last);
    const pendingToo = last.next();
    client.close();
    assert.deepEqual(await pendingToo, { done: true, value: undefined });
    assert.equal(last.closed, true);
    await own.waitForWatchers(0);
    idle.close();
    assert.deepEqual(await idle.next(), { done: true, value: undefined });
  });

  it('rejects with AgentShuttingDownError when the agent shuts down (SIGTERM)', async (t) => {
    const own = await startAgent();
    t.after(() => own.cleanup());
    const client = new Client({ socket: own.socket });
    t.after(() => client.close());
    const watch = client.watchToken();
    await take(watch);
    const next = watch.next();
    await own.stop();
    await assert.rejects(next, (error) => {
      assert.ok(error instanceof AgentShuttingDownError, String(error));
      assert.ok(error instanceof UnavailableError && error instanceof SkykitAgentError);
      assert.equal(error.name, 'AgentShuttingDownError');
      assert.equal(error.code, 'UNAVAILABLE');
      assert.equal(error.grpcCode, 14);
      assert.match(error.message, /shutting down.*watch again/);
      return true;
    });
    assert.equal(watch.closed, true);
    assert.deepEqual(await watch.next(), { done: true, value: undefined });
  });

  it('with reconnect, watches the agent again after it restarts', async (t) => {
    fastBackoff(t);
    const own = await startAgent();
    t.after(() => own.cleanup());
    const client = new Client({ socket: own.socket });
    t.after(() => client.close());
    const watch = client.watchToken({ lifetime: 600, reconnect: true });
    const first = await take(watch);
    await own.stop();
    // A new key, so the new agent's token surely differs from the last.
    const newKey = own.rotate({ reload: false });
    const next = take(watch);
    await sleep(50);
    await own.start();
    const again = await next;
    verifyTokenObject(again, newKey, { lifetime: 600 });
    assert.notEqual(again.token, first.token);
    await own.waitForWatchers(1);
    await watch.return();
    await own.waitForWatchers(0);
    // Refusals are not retried.
    await assert.rejects(client.watchToken({ identity: 'nope', reconnect: true }).next(), NotFoundError);
  });
});

describe('the watch-backed cache (watch: true)', () => {
  function countingClient(socket) {
    const counter = callCounter();
    const client = new Client({ socket, watch: true, grpcOptions: { interceptors: [counter.interceptor] } });
    return { client, counter };
  }

  it('answers repeated getToken calls from pushed tokens, a rotated key at once', async (t) => {
    const own = agent;
    await own.waitForWatchers(0);
    const { client, counter } = countingClient(own.socket);
    t.after(() => client.close());

    const first = await client.getToken({ lifetime: 600 });
    verifyTokenObject(first, own.publicKey, { lifetime: 600 });
    await own.waitForWatchers(1);
    assert.deepEqual(counter.byMethod, { GetToken: 1, WatchToken: 1 });
    for (let i = 0; i < 200; i++) {
      assert.equal((await client.getToken({ lifetime: 600 })).token, first.token);
    }
    assert.deepEqual(counter.byMethod, { GetToken: 1, WatchToken: 1 }, 'no call per getToken');

    // A rotation reaches the cache at once, with no call to the agent.
    const newKey = own.rotate();
    const rotated = await eventually(async () => {
      const token = await client.getToken({ lifetime: 600 });
      return token.token !== first.token && token;
    }, 'the rotated token in the cache');
    verifyTokenObject(rotated, newKey, { lifetime: 600 });
    assert.deepEqual(counter.byMethod, { GetToken: 1, WatchToken: 1 });
    assert.equal((await own.status()).watchers, 1);

    // Another (identity, lifetime): one more call, one more watch.
    await client.getToken({ lifetime: 700 });
    await own.waitForWatchers(2);
    assert.deepEqual(counter.byMethod, { GetToken: 2, WatchToken: 2 });

    client.close();
    await own.waitForWatchers(0);
  });

  it('serves a pushed token a little past refreshAfter, then asks the agent', async (t) => {
    const own = agent;
    await own.waitForWatchers(0);
    const { client, counter } = countingClient(own.socket);
    t.after(() => client.close());
    const first = await client.getToken({ lifetime: 900 });
    await own.waitForWatchers(1);
    const at = async (ms) => {
      mock.timers.enable({ apis: ['Date'], now: ms });
      try {
        const before = counter.byMethod.GetToken;
        const token = await client.getToken({ lifetime: 900 });
        assert.equal(token.token, first.token, "the agent's clock has not reached refreshAfter");
        return counter.byMethod.GetToken - before;
      } finally {
        mock.timers.reset();
      }
    };
    // Once the watch's first token is in, a second past refreshAfter (within
    // the grace) is served from the cache...
    await eventually(async () => (await at(first.refreshAfter.getTime() + 1_000)) === 0, 'the watch is up');
    // ... and past the grace, getToken asks the agent.
    assert.equal(await at(first.refreshAfter.getTime() + PUSH_GRACE_MS + 1_000), 1);
    const calls = counter.byMethod.GetToken;
    await client.getToken({ lifetime: 900, minValidFor: 900 });
    assert.equal(counter.byMethod.GetToken, calls + 1, 'minValidFor the cached token cannot meet: asks the agent');
    assert.equal(counter.byMethod.WatchToken, 1);
  });

  it('falls back to plain caching while the agent is away, and watches again when it is back', async (t) => {
    fastBackoff(t);
    const own = await startAgent();
    t.after(() => own.cleanup());
    const { client, counter } = countingClient(own.socket);
    t.after(() => client.close());
    const first = await client.getToken({ lifetime: 600 });
    await own.waitForWatchers(1);
    await own.stop();
    // As without watch: the cached token until refreshAfter.
    assert.equal((await client.getToken({ lifetime: 600 })).token, first.token);
    assert.equal(counter.byMethod.GetToken, 1);
    await assert.rejects(client.getToken({ lifetime: 600, minValidFor: 600 }), AgentUnreachableError);
    // Back, with a new key: the watch reconnects and the cache holds the
    // new agent's token without a getToken call.
    const newKey = own.rotate({ reload: false });
    await own.start();
    await own.waitForWatchers(1);
    const getTokens = counter.byMethod.GetToken;
    const token = await eventually(async () => {
      const t2 = await client.getToken({ lifetime: 600 });
      return t2.token !== first.token && t2;
    }, "the new agent's token");
    verifyTokenObject(token, newKey, { lifetime: 600 });
    assert.equal(counter.byMethod.GetToken, getTokens);
    client.close();
    await own.waitForWatchers(0);
  });

  it('is off by default', async (t) => {
    const own = agent;
    await own.waitForWatchers(0);
    const counter = callCounter();
    const client = new Client({ socket: own.socket, grpcOptions: { interceptors: [counter.interceptor] } });
    t.after(() => client.close());
    await client.getToken({ lifetime: 600 });
    await client.getToken({ lifetime: 600 });
    assert.deepEqual(counter.byMethod, { GetToken: 1 });
    await own.waitForWatchers(0);
  });
});
