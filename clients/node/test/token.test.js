'use strict';

// Tokens from the real agent, verified with its public key.

const assert = require('node:assert/strict');
const { describe, it, before, after } = require('node:test');
const util = require('node:util');

const { Client, Token } = require('..');
const { startAgent, verifyTokenObject } = require('./helpers');

describe('getToken against the real agent', () => {
  let agent;
  let client;

  before(async () => {
    agent = await startAgent();
    client = new Client({ socket: agent.socket });
  });

  after(async () => {
    if (client) client.close();
    if (agent) await agent.cleanup();
  });

  it('returns a token of the default identity and lifetime (3600 s) that verifies with the public key', async () => {
    const result = await client.getToken();
    assert.ok(result instanceof Token);
    verifyTokenObject(result, agent.publicKey, { lifetime: 3600, identity: 'default' });
    assert.equal(client.socket, agent.socket);
  });

  it('honours the requested lifetime', async () => {
    const result = await client.getToken({ lifetime: 600 });
    verifyTokenObject(result, agent.publicKey, { lifetime: 600 });
  });

  it('accepts the default identity by name and the boundaries 60 s and 3600 s', async () => {
    verifyTokenObject(await client.getToken({ identity: 'default', lifetime: 60 }), agent.publicKey, { lifetime: 60 });
    verifyTokenObject(await client.getToken({ identity: 'default', lifetime: 3600 }), agent.publicKey, { lifetime: 3600 });
  });

  it('sends min_valid_for to the agent', async () => {
    const result = await client.getToken({ lifetime: 120, minValidFor: 120 });
    verifyTokenObject(result, agent.publicKey, { lifetime: 120 });
  });

  it('keeps the token out of util.inspect, JSON and toString, but .token returns it', async () => {
    const result = await client.getToken({ lifetime: 600 });
    const jwt = result.token;
    assert.equal(jwt.split('.').length, 3);
    for (const shown of [
      util.inspect(result),
      util.inspect(result, { showHidden: true, depth: Infinity }),
      util.format('%o', result),
      JSON.stringify(result),
      JSON.stringify({ nested: [result] }),
      String(result),
      `${result}`,
      JSON.stringify({ ...result }),
      Object.keys(result).join(','),
    ]) {
      assert.ok(!shown.includes(jwt), `the token leaked: ${shown}`);
      assert.ok(!shown.includes(jwt.split('.')[2]), `the signature leaked: ${shown}`);
    }
    assert.match(util.inspect(result), /token: '\[redacted\]'/);
    const json = JSON.parse(JSON.stringify(result));
    assert.deepEqual(json, {
      token: '[redacted]',
      issuedAt: result.issuedAt.toISOString(),
      expiresAt: result.expiresAt.toISOString(),
      refreshAfter: result.refreshAfter.toISOString(),
      issuer: 'test@example.com',
      identity: 'default',
      keyId: result.keyId,
    });
    const { token } = result;
    assert.equal(token, jwt);
    assert.ok(Object.isFrozen(result));
  });

  it('answers concurrent calls', async () => {
    const results = await Promise.all([60, 120, 180, 240, 300].map((lifetime) => client.getToken({ lifetime })));
    results.forEach((result, i) => verifyTokenObject(result, agent.publicKey, { lifetime: (i + 1) * 60 }));
  });
});
