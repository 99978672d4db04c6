'use strict';

// Socket discovery: the shared table in clients/testdata, and the real
// thing through $XDG_RUNTIME_DIR and $SKYKIT_AGENT_SOCKET.

const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { describe, it, before, after } = require('node:test');

const { Client, candidates, SYSTEM_SOCKET } = require('..');
const { startAgent, tempDir, verifyTokenObject } = require('./helpers');

const TABLE = path.resolve(__dirname, '..', '..', 'testdata', 'socket-discovery.json');

describe('candidates(argument, env) against clients/testdata/socket-discovery.json', () => {
  if (!fs.existsSync(TABLE)) {
    throw new Error(`the shared discovery table ${TABLE} is missing (run the tests inside the skykit-agent repo)`);
  }
  const { cases } = JSON.parse(fs.readFileSync(TABLE, 'utf8'));
  assert.ok(Array.isArray(cases) && cases.length > 0, 'the table has cases');

  for (const c of cases) {
    it(c.name, () => {
      const env = Object.freeze({ ...c.env });
      const got = candidates(c.argument, env);
      assert.deepEqual(
        got.map((candidate) => candidate.path),
        c.candidates,
      );
    });
  }

  it('names what each candidate came from', () => {
    assert.deepEqual(candidates('/a.sock', { SKYKIT_AGENT_SOCKET: '/e.sock' }), [{ path: '/a.sock', namedBy: 'argument' }]);
    assert.deepEqual(candidates(null, { SKYKIT_AGENT_SOCKET: '/e.sock', XDG_RUNTIME_DIR: '/x' }), [
      { path: '/e.sock', namedBy: '$SKYKIT_AGENT_SOCKET' },
    ]);
    assert.deepEqual(candidates(undefined, { XDG_RUNTIME_DIR: '/x', SKYKIT_AGENT_SOCKET: '' }), [
      { path: '/x/skykit-agent/agent.sock', namedBy: '$XDG_RUNTIME_DIR' },
      { path: SYSTEM_SOCKET, namedBy: 'system default' },
    ]);
    assert.deepEqual(candidates('', { XDG_RUNTIME_DIR: '' }), [{ path: '/run/skykit-agent/agent.sock', namedBy: 'system default' }]);
  });

  it('reads process.env when no env is given', () => {
    const saved = { ...process.env };
    try {
      delete process.env.SKYKIT_AGENT_SOCKET;
      process.env.XDG_RUNTIME_DIR = '/from-process-env';
      assert.deepEqual(
        candidates().map((c) => c.path),
        ['/from-process-env/skykit-agent/agent.sock', SYSTEM_SOCKET],
      );
    } finally {
      restoreEnv(saved);
    }
  });
});

function restoreEnv(saved) {
  for (const key of Object.keys(process.env)) if (!(key in saved)) delete process.env[key];
  Object.assign(process.env, saved);
}

describe('discovery with a live agent', () => {
  let xdg;
  let agent;
  const saved = { ...process.env };

  before(async () => {
    xdg = tempDir('skykit-node-xdg-');
    agent = await startAgent({ socket: path.join(xdg, 'skykit-agent', 'agent.sock') });
  });

  after(async () => {
    restoreEnv(saved);
    if (agent) await agent.cleanup();
    if (xdg) fs.rmSync(xdg, { recursive: true, force: true });
  });

  it('finds the agent at $XDG_RUNTIME_DIR/skykit-agent/agent.sock with no argument', async () => {
    delete process.env.SKYKIT_AGENT_SOCKET;
    process.env.XDG_RUNTIME_DIR = xdg;
    const client = new Client();
    try {
      const result = await client.getToken({ lifetime: 300 });
      verifyTokenObject(result, agent.publicKey, { lifetime: 300 });
      assert.equal(client.socket, path.join(xdg, 'skykit-agent', 'agent.sock'));
    } finally {
      client.close();
      restoreEnv(saved);
    }
  });

  it('an empty $SKYKIT_AGENT_SOCKET counts as unset', async () => {
    process.env.SKYKIT_AGENT_SOCKET = '';
    process.env.XDG_RUNTIME_DIR = xdg;
    const client = new Client();
    try {
      verifyTokenObject(await client.getToken(), agent.publicKey, { lifetime: 3600 });
    } finally {
      client.close();
      restoreEnv(saved);
    }
  });

  it('finds the agent through $SKYKIT_AGENT_SOCKET, which wins over $XDG_RUNTIME_DIR', async () => {
    const emptyXdg = tempDir('skykit-node-xdg-empty-');
    process.env.SKYKIT_AGENT_SOCKET = agent.socket;
    process.env.XDG_RUNTIME_DIR = emptyXdg;
    const client = new Client();
    try {
      verifyTokenObject(await client.getToken({ lifetime: 120 }), agent.publicKey, { lifetime: 120 });
      assert.equal(client.socket, agent.socket);
    } finally {
      client.close();
      restoreEnv(saved);
      fs.rmSync(emptyXdg, { recursive: true, force: true });
    }
  });

  it('the socket argument wins over the environment', async () => {
    const client = new Client({
      socket: agent.socket,
      env: { SKYKIT_AGENT_SOCKET: '/nonexistent/agent.sock', XDG_RUNTIME_DIR: '/nonexistent' },
    });
    try {
      verifyTokenObject(await client.getToken({ lifetime: 180 }), agent.publicKey, { lifetime: 180 });
    } finally {
      client.close();
    }
  });
});
