'use strict';

// Errors: unreachable (with every path tried and why), and the agent's
// INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED and UNAVAILABLE.

const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { describe, it, before, after } = require('node:test');

const grpc = require('@grpc/grpc-js');

const pkg = require('..');
const {
  Client,
  SkykitAgentError,
  AgentUnreachableError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  UnavailableError,
  SYSTEM_SOCKET,
} = pkg;
const { tokenServiceClass } = require('../lib/client');
const { startAgent, tempDir, staleSocket } = require('./helpers');

const PACKAGE_DIR = path.resolve(__dirname, '..');

/**
 * Runs the client as uid 65534 (setpriv) against `socketPath` and returns
 * the spawnSync result; its stdout is the error as JSON. When that uid cannot
 * read this package where it is (e.g. a checkout under /root), the package
 * and its runtime dependencies are copied into `scratch` first.
 */
function runAsOtherUid(socketPath, scratch) {
  const attempt = (packageDir) => {
    const script = `
      const { Client } = require(${JSON.stringify(packageDir)});
      new Client({ socket: ${JSON.stringify(socketPath)} }).getToken().then(
        () => { console.log(JSON.stringify({ ok: true })); },
        (e) => { console.log(JSON.stringify({ name: e.name, message: e.message, attempts: e.attempts })); });`;
    const run = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', script], {
      encoding: 'utf8',
      timeout: 20_000,
    });
    if (run.error) throw new Error(`setpriv (util-linux) is required to run this test as root: ${run.error.message}`);
    return run;
  };
  let run = attempt(PACKAGE_DIR);
  if (run.status !== 0 && /EACCES|Cannot find module/.test(run.stderr)) {
    const copy = path.join(scratch, 'package');
    for (const entry of ['package.json', 'index.js', 'lib', 'proto', 'node_modules']) {
      fs.cpSync(path.join(PACKAGE_DIR, entry), path.join(copy, entry), {
        recursive: true,
        filter: (source) => !/node_modules[/\\](typescript|@types)([/\\]|$)/.test(source),
      });
    }
    fs.chmodSync(copy, 0o755);
    run = attempt(copy);
  }
  assert.equal(run.status, 0, `the client as uid 65534 failed: ${run.stderr}`);
  return run;
}

const HINT = 'start the agent (`skykit-agent serve`, or `systemctl start skykit-agent`)';

function unreachable(check) {
  return (error) => {
    assert.ok(error instanceof AgentUnreachableError, `expected AgentUnreachableError, got ${error && error.stack}`);
    assert.ok(error instanceof SkykitAgentError);
    assert.ok(error instanceof Error);
    assert.equal(error.name, 'AgentUnreachableError');
    check(error);
    return true;
  };
}

function expectedMessage(attempts) {
  return `cannot reach skykit-agent; tried:${attempts.map((a) => `\n  ${a.path} (${a.namedBy}): ${a.reason}`).join('')}\n`;
}

describe('unreachable agent', () => {
  let dir;

  before(() => {
    dir = tempDir();
  });

  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('names a missing socket from the argument and says it does not exist', async () => {
    const missing = path.join(dir, 'missing', 'agent.sock');
    const client = new Client({ socket: missing });
    await assert.rejects(
      client.getToken(),
      unreachable((error) => {
        assert.deepEqual(error.attempts, [{ path: missing, namedBy: 'argument', reason: 'does not exist' }]);
        assert.ok(error.message.startsWith(expectedMessage(error.attempts)), error.message);
        assert.ok(error.message.includes(HINT));
      }),
    );
    client.close();
  });

  it('names a missing socket from $SKYKIT_AGENT_SOCKET', async () => {
    const missing = path.join(dir, 'env-missing.sock');
    const client = new Client({ env: { SKYKIT_AGENT_SOCKET: missing, XDG_RUNTIME_DIR: dir } });
    await assert.rejects(
      client.getToken(),
      unreachable((error) => {
        assert.deepEqual(error.attempts, [{ path: missing, namedBy: '$SKYKIT_AGENT_SOCKET', reason: 'does not exist' }]);
        assert.ok(error.message.includes(`\n  ${missing} ($SKYKIT_AGENT_SOCKET): does not exist`));
      }),
    );
  });

  it('reports a stale socket file (nothing listening: connection refused)', async () => {
    const stale = await staleSocket(path.join(dir, 'stale.sock'));
    const client = new Client({ socket: stale });
    await assert.rejects(
      client.getToken({ lifetime: 600 }),
      unreachable((error) => {
        assert.equal(error.attempts.length, 1);
        assert.equal(error.attempts[0].path, stale);
        assert.match(error.attempts[0].reason, /^nothing is listening \(connection refused/);
        assert.ok(error.message.includes(`\n  ${stale} (argument): nothing is listening (connection refused`), error.message);
      }),
    );
    client.close();
  });

  it('lists every discovered path tried when none exists', async () => {
    const xdg = path.join(dir, 'xdg-empty');
    fs.mkdirSync(xdg);
    const client = new Client({ env: { XDG_RUNTIME_DIR: xdg } });
    const xdgSocket = path.join(xdg, 'skykit-agent', 'agent.sock');
    if (fs.existsSync(SYSTEM_SOCKET)) {
      // Then the system path would be tried; this machine runs an agent.
      throw new Error(`${SYSTEM_SOCKET} exists on this machine: this test needs it absent`);
    }
    await assert.rejects(
      client.getToken(),
      unreachable((error) => {
        assert.deepEqual(error.attempts, [
          { path: xdgSocket, namedBy: '$XDG_RUNTIME_DIR', reason: 'does not exist' },
          { path: SYSTEM_SOCKET, namedBy: 'system default', reason: 'does not exist' },
        ]);
        assert.ok(error.message.startsWith(expectedMessage(error.attempts)), error.message);
      }),
    );
  });

  it('stops at the first existing discovered path when it is stale', async () => {
    const xdg = path.join(dir, 'xdg-stale');
    fs.mkdirSync(path.join(xdg, 'skykit-agent'), { recursive: true });
    const stale = await staleSocket(path.join(xdg, 'skykit-agent', 'agent.sock'));
    const client = new Client({ env: { XDG_RUNTIME_DIR: xdg, SKYKIT_AGENT_SOCKET: '' } });
    await assert.rejects(
      client.getToken(),
      unreachable((error) => {
        assert.equal(error.attempts.length, 1);
        assert.equal(error.attempts[0].path, stale);
        assert.equal(error.attempts[0].namedBy, '$XDG_RUNTIME_DIR');
        assert.match(error.attempts[0].reason, /connection refused/);
      }),
    );
  });

  it('reports a socket the caller may not open as permission denied for its uid', async () => {
    // A listening socket with mode 0600, owned by the test's uid.
    const sockDir = path.join(dir, 'private');
    fs.mkdirSync(sockDir);
    const socketPath = path.join(sockDir, 'agent.sock');
    const server = net.createServer((connection) => connection.destroy());
    await new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, resolve);
    });
    try {
      let result;
      if (process.getuid() === 0) {
        // Root may open any socket: run the client as another uid (65534)
        // with setpriv, in dirs it can traverse.
        fs.chmodSync(socketPath, 0o600);
        fs.chmodSync(dir, 0o711);
        fs.chmodSync(sockDir, 0o711);
        const run = runAsOtherUid(socketPath, dir);
        result = { uid: 65534, ...JSON.parse(run.stdout.trim()) };
      } else {
        fs.chmodSync(socketPath, 0o000);
        const error = await new Client({ socket: socketPath }).getToken().catch((e) => e);
        result = { uid: process.getuid(), name: error.name, message: error.message, attempts: error.attempts };
      }
      assert.equal(result.name, 'AgentUnreachableError', JSON.stringify(result));
      assert.equal(result.attempts.length, 1);
      assert.equal(result.attempts[0].path, socketPath);
      assert.match(result.attempts[0].reason, new RegExp(`^permission denied for uid ${result.uid}\\b`));
      assert.ok(result.message.includes(`\n  ${socketPath} (argument): permission denied for uid ${result.uid}`), result.message);
    } finally {
      await new Promise((resolve) => server.close(resolve));
    }
  });
});

describe('the agent refuses the request', () => {
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

  function refused(Type, code, pattern) {
    return (error) => {
      assert.ok(error instanceof Type, `expected ${Type.name}, got ${error && error.stack}`);
      assert.ok(error instanceof SkykitAgentError);
      assert.equal(error.name, Type.name);
      assert.equal(error.code, code);
      assert.equal(error.grpcCode, grpc.status[code]);
      assert.equal(error.message, error.details, "the message is the agent's");
      assert.match(error.message, pattern);
      return true;
    };
  }

  it('lifetime 3601 s: InvalidArgumentError naming the limit and the value', async () => {
    await assert.rejects(client.getToken({ lifetime: 3601 }), refused(InvalidArgumentError, 'INVALID_ARGUMENT', /3601/));
    await assert.rejects(client.getToken({ lifetime: 3601 }), refused(InvalidArgumentError, 'INVALID_ARGUMENT', /3600/));
  });

  it('lifetime 59 s, fractional seconds and min_valid_for > lifetime: InvalidArgumentError', async () => {
    await assert.rejects(client.getToken({ lifetime: 59 }), refused(InvalidArgumentError, 'INVALID_ARGUMENT', /59/));
    await assert.rejects(client.getToken({ lifetime: 600.5 }), refused(InvalidArgumentError, 'INVALID_ARGUMENT', /nano/));
    await assert.rejects(
      client.getToken({ lifetime: 600, minValidFor: 700 }),
      refused(InvalidArgumentError, 'INVALID_ARGUMENT', /700/),
    );
  });

  it('identity "nope": NotFoundError naming it', async () => {
    await assert.rejects(client.getToken({ identity: 'nope' }), refused(NotFoundError, 'NOT_FOUND', /"nope"/));
  });

  it('rejects arguments of the wrong type before calling the agent', async () => {
    await assert.rejects(client.getToken({ lifetime: '600s' }), TypeError);
    await assert.rejects(client.getToken({ lifetime: Number.NaN }), TypeError);
    await assert.rejects(client.getToken({ identity: 7 }), TypeError);
    assert.throws(() => new Client({ socket: 7 }), TypeError);
  });

  it('rejects getToken after close', async () => {
    const closed = new Client({ socket: agent.socket });
    await closed.getToken({ lifetime: 600 });
    closed.close();
    await assert.rejects(closed.getToken({ lifetime: 600 }), (error) => {
      assert.ok(error instanceof SkykitAgentError);
      assert.match(error.message, /closed/);
      return true;
    });
  });
});

describe('status mapping (a stand-in gRPC server on a Unix socket)', () => {
  // The real agent cannot yet be made to answer PERMISSION_DENIED (access
  // control comes later) or UNAVAILABLE (signing failed), so a grpc-js
  // server with the same service answers them here.
  let dir;
  let server;
  let socketPath;
  const seen = [];
  let answer;

  before(async () => {
    dir = tempDir();
    socketPath = path.join(dir, 'fake.sock');
    server = new grpc.Server();
    server.addService(tokenServiceClass().service, {
      getToken(call, callback) {
        seen.push({ authority: call.getHost(), request: call.request });
        callback(answer);
      },
    });
    await new Promise((resolve, reject) =>
      server.bindAsync(`unix:${socketPath}`, grpc.ServerCredentials.createInsecure(), (error) =>
        error ? reject(error) : resolve(),
      ),
    );
  });

  after(async () => {
    if (server) await new Promise((resolve) => server.tryShutdown(resolve));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('PERMISSION_DENIED: PermissionDeniedError with the agent message', async () => {
    answer = { code: grpc.status.PERMISSION_DENIED, details: 'uid 1234 may not get tokens of identity "default"' };
    const client = new Client({ socket: socketPath });
    try {
      await assert.rejects(client.getToken({ identity: 'default', lifetime: 600, minValidFor: 60 }), (error) => {
        assert.ok(error instanceof PermissionDeniedError);
        assert.ok(error instanceof SkykitAgentError);
        assert.equal(error.code, 'PERMISSION_DENIED');
        assert.equal(error.message, 'uid 1234 may not get tokens of identity "default"');
        return true;
      });
    } finally {
      client.close();
    }
    const last = seen.at(-1);
    assert.equal(last.authority, 'localhost', 'the HTTP/2 authority is "localhost"');
    assert.deepEqual(last.request, {
      identity: 'default',
      lifetime: { seconds: 600, nanos: 0 },
      minValidFor: { seconds: 60, nanos: 0 },
    });
  });

  it('UNAVAILABLE from a reachable agent: UnavailableError, not unreachable', async () => {
    answer = { code: grpc.status.UNAVAILABLE, details: 'signing failed and no token is cached' };
    const client = new Client({ socket: socketPath });
    try {
      await assert.rejects(client.getToken(), (error) => {
        assert.ok(error instanceof UnavailableError, String(error));
        assert.ok(!(error instanceof AgentUnreachableError));
        assert.equal(error.message, 'signing failed and no token is cached');
        return true;
      });
    } finally {
      client.close();
    }
    assert.deepEqual(seen.at(-1).request, { identity: '', lifetime: null, minValidFor: null });
  });

  it('any other status: SkykitAgentError naming the status', async () => {
    answer = { code: grpc.status.INTERNAL, details: 'boom' };
    const client = new Client({ socket: socketPath });
    try {
      await assert.rejects(client.getToken(), (error) => {
        assert.equal(error.constructor, SkykitAgentError);
        assert.equal(error.code, 'INTERNAL');
        assert.equal(error.details, 'boom');
        assert.equal(error.message, 'the agent answered INTERNAL: boom');
        return true;
      });
    } finally {
      client.close();
    }
  });

  it('exports every error class', () => {
    for (const Type of [AgentUnreachableError, InvalidArgumentError, NotFoundError, PermissionDeniedError, UnavailableError]) {
      assert.ok(Object.prototype.isPrototypeOf.call(SkykitAgentError, Type), Type.name);
      assert.equal(pkg[Type.name], Type);
    }
  });
});
