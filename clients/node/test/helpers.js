'use strict';

// Test support: start the real skykit-agent binary ($SKYKIT_AGENT_BIN) on a
// socket in a temp dir, and verify its tokens with the public key.

const assert = require('node:assert/strict');
const { spawn, execFileSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { once } = require('node:events');
const { setTimeout: sleep } = require('node:timers/promises');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { LOADER_OPTIONS, PROTO_FILE } = require('../lib/client');

const ISSUER = 'test@example.com';
const START_DEADLINE_MS = 20_000;
const STOP_DEADLINE_MS = 10_000;

/** The agent binary; throws (failing the test loudly) when it is not there. */
function agentBin() {
  const bin = process.env.SKYKIT_AGENT_BIN;
  if (!bin) {
    throw new Error(
      'SKYKIT_AGENT_BIN is not set: build the agent (`cargo build`) and export ' +
        'SKYKIT_AGENT_BIN=$PWD/target/debug/skykit-agent before running the Node client tests',
    );
  }
  try {
    fs.accessSync(bin, fs.constants.X_OK);
  } catch (error) {
    throw new Error(`SKYKIT_AGENT_BIN=${bin} is not an executable file (${error.code}): build the agent with \`cargo build\``);
  }
  return bin;
}

/** A new temp dir (mode 0700) that the caller removes. */
function tempDir(prefix = 'skykit-node-') {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

function connectOnce(socketPath) {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path: socketPath });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => {
      socket.destroy();
      resolve(false);
    });
  });
}

/**
 * Starts `skykit-agent serve` with a new key in a new temp dir.
 * @param {{socket?: string}} [options] socket: where to listen (default DIR/agent.sock)
 */
async function startAgent(options = {}) {
  const bin = agentBin();
  const dir = tempDir();
  const env = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir };
  execFileSync(bin, ['keygen', '--out', dir], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  // An empty config file keeps the agent from reading /etc/skykit-agent.
  const config = path.join(dir, 'config.toml');
  fs.writeFileSync(config, '');
  const socket = options.socket ?? path.join(dir, 'agent.sock');
  fs.mkdirSync(path.dirname(socket), { recursive: true });
  const logPath = path.join(dir, 'agent.log');
  const readLog = () => (fs.existsSync(logPath) ? fs.readFileSync(logPath, 'utf8') : '');

  // The running process: {child, exit, exited(), stopped}.
  let running = null;
  async function serve() {
    const log = fs.openSync(logPath, 'a');
    const child = spawn(
      bin,
      ['serve', '--config', config, '--socket', socket, '--key', path.join(dir, 'private.pem'), '--issuer', ISSUER],
      { env, stdio: ['ignore', log, log] },
    );
    fs.closeSync(log);
    let exited = null;
    const exit = once(child, 'exit').then(([code, signal]) => {
      exited = { code, signal };
    });
    const deadline = Date.now() + START_DEADLINE_MS;
    for (;;) {
      if (exited) {
        throw new Error(`skykit-agent serve exited (${JSON.stringify(exited)}) before listening on ${socket}:\n${readLog()}`);
      }
      if (await connectOnce(socket)) break;
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        await exit;
        throw new Error(`skykit-agent did not listen on ${socket} within ${START_DEADLINE_MS} ms:\n${readLog()}`);
      }
      await sleep(25);
    }
    running = { child, exit, exited: () => exited, stopped: false };
  }
  try {
    await serve();
  } catch (error) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw error;
  }

  let rotations = 0;
  return {
    dir,
    socket,
    publicKey: fs.readFileSync(path.join(dir, 'public.pem'), 'utf8'),
    /** The agent's process (a new one after start()). */
    get child() {
      return running.child;
    },
    log: readLog,
    /** Starts the agent again after stop(), on the same socket and key file. */
    async start() {
      if (running && !running.stopped) throw new Error('the agent is running');
      await serve();
    },
    /** Stops the agent with SIGTERM and waits for it to exit. */
    async stop() {
      const current = running;
      if (!current || current.stopped) return;
      current.stopped = true;
      if (!current.exited()) {
        current.child.kill('SIGTERM');
        const timer = setTimeout(() => current.child.kill('SIGKILL'), STOP_DEADLINE_MS);
        await current.exit;
        clearTimeout(timer);
      }
    },
    /**
     * Replaces the key file with a new key (atomically, mode 0600) and, with
     * `reload`, sends SIGHUP so that the agent signs with it. Returns the new
     * public key (also `publicKey` from now on).
     */
    rotate({ reload = true } = {}) {
      rotations += 1;
      const next = path.join(dir, `key-${rotations}`);
      fs.mkdirSync(next);
      execFileSync(bin, ['keygen', '--out', next], { env, stdio: ['ignore', 'pipe', 'pipe'] });
      fs.renameSync(path.join(next, 'private.pem'), path.join(dir, 'private.pem'));
      this.publicKey = fs.readFileSync(path.join(next, 'public.pem'), 'utf8');
      if (reload) {
        assert.ok(running && !running.exited(), 'the agent is running');
        running.child.kill('SIGHUP');
      }
      return this.publicKey;
    },
    /** The agent's GetStatus answer (AgentService; root or the agent's uid may ask). */
    status() {
      return agentStatus(socket);
    },
    /** Polls GetStatus until the agent counts `count` watchers. */
    async waitForWatchers(count, deadlineMs = 10_000) {
      const deadline = Date.now() + deadlineMs;
      for (;;) {
        const { watchers } = await agentStatus(socket);
        if (watchers === count) return;
        if (Date.now() > deadline) throw new Error(`the agent counts ${watchers} watchers, not ${count}, after ${deadlineMs} ms`);
        await sleep(20);
      }
    },
    /** Stops the agent and removes its temp dir. */
    async cleanup() {
      await this.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

let agentServiceClass;

/** GetStatus of the agent on `socketPath`, over a channel of its own. */
function agentStatus(socketPath) {
  if (!agentServiceClass) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    agentServiceClass = grpc.loadPackageDefinition(definition).skykit.agent.v1.AgentService;
  }
  const stub = new agentServiceClass(`unix:${path.resolve(socketPath)}`, grpc.credentials.createInsecure(), {
    'grpc.default_authority': 'localhost',
  });
  return new Promise((resolve, reject) => {
    stub.getStatus({}, { deadline: Date.now() + 10_000 }, (error, value) => {
      stub.close();
      if (error) reject(error);
      else resolve(value);
    });
  });
}

const HEADER = '{"alg":"RS256","typ":"JWT"}';

/**
 * Verifies the JWT's RS256 signature with the public key, its exact header
 * bytes and its claims (exactly iss, iat, exp; exp - iat = lifetime).
 * Returns the claims.
 */
function verifyToken(token, publicKeyPem, { lifetime = 3600 } = {}) {
  assert.equal(typeof token, 'string');
  const parts = token.split('.');
  assert.equal(parts.length, 3, 'a JWS compact serialization has three parts');
  const [header, payload, signature] = parts;
  for (const part of parts) assert.match(part, /^[A-Za-z0-9_-]+$/, 'unpadded base64url');
  assert.equal(Buffer.from(header, 'base64url').toString('utf8'), HEADER);
  const valid = crypto.verify(
    'RSA-SHA256',
    Buffer.from(`${header}.${payload}`, 'ascii'),
    publicKeyPem,
    Buffer.from(signature, 'base64url'),
  );
  assert.equal(valid, true, 'the RS256 signature verifies with the public key');
  const claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
  assert.deepEqual(Object.keys(claims).sort(), ['exp', 'iat', 'iss']);
  assert.equal(claims.iss, ISSUER);
  assert.ok(Number.isInteger(claims.iat) && Number.isInteger(claims.exp), 'iat and exp are whole seconds');
  assert.equal(claims.exp - claims.iat, lifetime);
  const now = Math.floor(Date.now() / 1000);
  assert.ok(Math.abs(claims.iat - now) <= 120, `iat ${claims.iat} is near now ${now}`);
  return claims;
}

/** Verifies a Token object: its JWT, and that its fields match the claims. */
function verifyTokenObject(result, publicKeyPem, { lifetime = 3600, identity = 'default' } = {}) {
  const claims = verifyToken(result.token, publicKeyPem, { lifetime });
  assert.ok(result.issuedAt instanceof Date && result.expiresAt instanceof Date && result.refreshAfter instanceof Date);
  assert.equal(result.issuedAt.getTime(), claims.iat * 1000);
  assert.equal(result.expiresAt.getTime(), claims.exp * 1000);
  assert.ok(result.refreshAfter > result.issuedAt && result.refreshAfter < result.expiresAt, 'refreshAfter lies within the validity');
  assert.equal(result.issuer, ISSUER);
  assert.equal(result.identity, identity);
  assert.equal(result.keyId, keyIdOf(publicKeyPem));
  return claims;
}

/** The agent's key_id: unpadded base64url SHA-256 of the RFC 7638 JWK thumbprint input. */
function keyIdOf(publicKeyPem) {
  const jwk = crypto.createPublicKey(publicKeyPem).export({ format: 'jwk' });
  const input = `{"e":"${jwk.e}","kty":"RSA","n":"${jwk.n}"}`;
  return crypto.createHash('sha256').update(input).digest('base64url');
}

/** Resolves once the wall clock is in a later whole second than `seconds`. */
async function untilSecondAfter(seconds) {
  const deadline = Date.now() + 5_000;
  while (Math.floor(Date.now() / 1000) <= seconds) {
    if (Date.now() > deadline) throw new Error('the clock did not advance');
    await sleep(10);
  }
}

/**
 * A stale socket: a socket file with nothing listening (bound, then the
 * listener closed without unlinking it: Node unlinks its own path, so the
 * file is hard-linked first).
 */
async function staleSocket(socketPath) {
  const bound = `${socketPath}.bound`;
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(bound, resolve);
  });
  fs.linkSync(bound, socketPath);
  await new Promise((resolve) => server.close(resolve));
  assert.ok(fs.lstatSync(socketPath).isSocket(), 'the stale socket file stays');
  return socketPath;
}

/**
 * A gRPC call counter to pass as Client's grpcOptions.interceptors: `calls`
 * counts every call, `byMethod` each method's ('GetToken', 'WatchToken').
 */
function callCounter() {
  const counter = {
    calls: 0,
    byMethod: {},
    interceptor(options, nextCall) {
      counter.calls += 1;
      const method = String(options.method_definition.path).split('/').pop();
      counter.byMethod[method] = (counter.byMethod[method] ?? 0) + 1;
      return nextCall(options);
    },
  };
  return counter;
}

module.exports = {
  ISSUER,
  agentBin,
  tempDir,
  startAgent,
  verifyToken,
  verifyTokenObject,
  keyIdOf,
  untilSecondAfter,
  staleSocket,
  callCounter,
  agentStatus,
  sleep,
};
