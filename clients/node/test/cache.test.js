'use strict';

// The client's cache: the last token per (identity, lifetime) until the
// agent's refresh_after, and min_valid_for.

const assert = require('node:assert/strict');
const { describe, it, before, after, mock } = require('node:test');

const { Client, AgentUnreachableError } = require('..');
const { startAgent, verifyTokenObject, untilSecondAfter, callCounter } = require('./helpers');

describe('caching', () => {
  let agent;

  before(async () => {
    agent = await startAgent();
  });

  after(async () => {
    if (agent) await agent.cleanup();
  });

  function countingClient() {
    const counter = callCounter();
    const client = new Client({ socket: agent.socket, grpcOptions: { interceptors: [counter.interceptor] } });
    return { client, counter };
  }

  it('returns the cached token without calling the agent until refresh_after', async (t) => {
    const { client, counter } = countingClient();
    t.after(() => client.close());

    const first = await client.getToken({ lifetime: 600 });
    verifyTokenObject(first, agent.publicKey, { lifetime: 600 });
    assert.equal(counter.calls, 1);
    assert.ok(Date.now() < first.refreshAfter.getTime());

    for (let i = 0; i < 50; i++) {
      const again = await client.getToken({ lifetime: 600 });
      assert.equal(again.token, first.token);
    }
    assert.equal(counter.calls, 1, 'a hot loop does not call the agent');

    // A min_valid_for the cached token meets is still served from the cache.
    assert.equal((await client.getToken({ lifetime: 600, minValidFor: 60 })).token, first.token);
    assert.equal(counter.calls, 1);

    // Another (identity, lifetime) is another cache entry.
    verifyTokenObject(await client.getToken({ lifetime: 300 }), agent.publicKey, { lifetime: 300 });
    assert.equal(counter.calls, 2);
    await client.getToken({ lifetime: 300 });
    assert.equal(counter.calls, 2);
    verifyTokenObject(await client.getToken({ identity: 'default', lifetime: 600 }), agent.publicKey, { lifetime: 600 });
    assert.equal(counter.calls, 3);
  });

  it('asks the agent again once refresh_after has passed', async (t) => {
    const { client, counter } = countingClient();
    t.after(() => client.close());
    const first = await client.getToken({ lifetime: 900 });
    assert.equal(counter.calls, 1);

    // Move the client's clock (Date only) to just before, then just past,
    // the agent's refresh_after.
    mock.timers.enable({ apis: ['Date'], now: first.refreshAfter.getTime() - 1 });
    try {
      await client.getToken({ lifetime: 900 });
      assert.equal(counter.calls, 1, 'before refresh_after: cached');
      mock.timers.setTime(first.refreshAfter.getTime());
      const second = await client.getToken({ lifetime: 900 });
      assert.equal(counter.calls, 2, 'at refresh_after: asks the agent');
      // The agent's own clock has not reached refresh_after, so it answers
      // from its cache with the same token.
      assert.equal(second.token, first.token);
    } finally {
      mock.timers.reset();
    }
  });

  it('goes to the agent when the cached token cannot meet min_valid_for, and caches the new token', async (t) => {
    const { client, counter } = countingClient();
    t.after(() => client.close());

    const first = await client.getToken({ lifetime: 240 });
    verifyTokenObject(first, agent.publicKey, { lifetime: 240 });
    const calls = counter.calls;

    // Poll the wall clock into a later second than the first token's iat:
    // from then on the cached token stays valid for less than its lifetime.
    await untilSecondAfter(first.issuedAt.getTime() / 1000);

    const meets = await client.getToken({ lifetime: 240, minValidFor: 200 });
    assert.equal(meets.token, first.token, 'a min_valid_for the cached token meets: cached');
    assert.equal(counter.calls, calls);

    const fresh = await client.getToken({ lifetime: 240, minValidFor: 240 });
    assert.equal(counter.calls, calls + 1, 'min_valid_for = lifetime: asks the agent');
    assert.notEqual(fresh.token, first.token, 'the agent re-signed');
    assert.ok(fresh.issuedAt > first.issuedAt, 'the new token has a later issued_at');
    verifyTokenObject(fresh, agent.publicKey, { lifetime: 240 });

    const cached = await client.getToken({ lifetime: 240 });
    assert.equal(cached.token, fresh.token, 'the new token replaced the cached one');
    assert.equal(counter.calls, calls + 1);
  });

  it('serves the cached token after the agent stopped', async () => {
    const own = await startAgent();
    const client = new Client({ socket: own.socket });
    try {
      const first = await client.getToken({ lifetime: 600 });
      verifyTokenObject(first, own.publicKey, { lifetime: 600 });
      await own.stop();

      const again = await client.getToken({ lifetime: 600 });
      assert.equal(again.token, first.token, 'served from the cache: the agent is gone');

      await assert.rejects(client.getToken({ lifetime: 601 }), (error) => {
        assert.ok(error instanceof AgentUnreachableError, String(error));
        assert.equal(error.attempts.length, 1);
        assert.equal(error.attempts[0].path, own.socket);
        assert.ok(error.message.includes(own.socket));
        return true;
      });
    } finally {
      client.close();
      await own.cleanup();
    }
  });
});
