'use strict';

const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { candidates, NAMED_BY_SYSTEM } = require('./discovery');
const errors = require('./errors');
const { fromResponse } = require('./token');
const { TokenWatch } = require('./watch');

const PROTO_DIR = path.join(__dirname, '..', 'proto');
const PROTO_FILE = 'skykit/agent/v1/agent.proto';

// keepCase: false, so fields are camelCase in JavaScript (minValidFor,
// issuedAt, keyId, ...). longs: Number (Duration/Timestamp seconds fit a
// double exactly); enums: String; defaults and oneofs on. The well-known
// google/protobuf/{duration,timestamp}.proto resolve from protobufjs's
// bundled copies.
const LOADER_OPTIONS = Object.freeze({
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
});

let serviceClass;
function tokenServiceClass() {
  if (!serviceClass) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    serviceClass = grpc.loadPackageDefinition(definition).skykit.agent.v1.TokenService;
  }
  return serviceClass;
}

const DEFAULT_TIMEOUT_MS = 10_000;

/** Why connecting to a socket path failed, worded like the Rust CLI. */
function describe(error) {
  switch (error && error.code) {
    case 'ENOENT':
      return 'does not exist';
    case 'ECONNREFUSED':
      return 'nothing is listening (connection refused: a socket file left by an agent that stopped)';
    case 'EACCES':
    case 'EPERM':
      return `permission denied for uid ${process.getuid ? process.getuid() : '?'}: ask the agent's operator for access to the socket`;
    case 'ETIMEDOUT':
      return 'timed out connecting';
    default:
      return error && error.message ? error.message : String(error);
  }
}

/** Connects once to the Unix socket at `socketPath` and closes again. */
function probe(socketPath, timeoutMs) {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path: socketPath });
    const timer = setTimeout(() => {
      socket.destroy();
      const error = new Error(`timed out after ${timeoutMs} ms`);
      error.code = 'ETIMEDOUT';
      reject(error);
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolve();
    });
    socket.once('error', (error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(error);
    });
  });
}

function exists(p) {
  try {
    fs.lstatSync(p);
    return true;
  } catch {
    return false;
  }
}

function toDuration(seconds, name) {
  if (seconds === undefined || seconds === null) return null;
  if (typeof seconds !== 'number' || !Number.isFinite(seconds)) {
    throw new TypeError(`${name} must be a finite number of seconds, got ${String(seconds)}`);
  }
  const whole = Math.trunc(seconds);
  const nanos = Math.round((seconds - whole) * 1e9);
  return { seconds: whole, nanos };
}

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/**
 * With a background watch up (watch: true), how long past a cached token's
 * refreshAfter it is still served while the agent's replacement is on its
 * way, before getToken asks the agent itself.
 */
const PUSH_GRACE_MS = 5_000;

function checkIdentity(identity) {
  if (identity !== undefined && identity !== null && typeof identity !== 'string') {
    throw new TypeError('identity must be a string');
  }
}

/**
 * A client of skykit-agent. It finds the agent's socket on first use
 * (see candidates()), and caches the last token per (identity, lifetime)
 * until the agent's refreshAfter (with `watch: true`, the latest token the
 * agent pushed).
 */
class Client {
  #socket;
  #env;
  #timeoutMs;
  #grpcOptions;
  #watch;
  #stub = null;
  #target = null; // {path, namedBy} of the connected socket
  #connecting = null;
  #closed = false;
  #cache = new Map(); // key -> {token, pushed}
  #feeds = new Map(); // key -> {watch, live}: the background watches of watch: true
  #watches = new Set(); // open TokenWatches, ended by close()
  #hooks; // what a TokenWatch uses of this client

  /**
   * @param {{socket?: string, env?: Record<string, string|undefined>,
   *          timeoutMs?: number, grpcOptions?: object, watch?: boolean}} [options]
   */
  constructor(options = {}) {
    const { socket, env, timeoutMs, grpcOptions, watch } = options || {};
    if (socket !== undefined && socket !== null && typeof socket !== 'string') {
      throw new TypeError('socket must be a string path');
    }
    this.#socket = socket ?? null;
    this.#env = env ?? process.env;
    this.#timeoutMs = timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#grpcOptions = grpcOptions ?? {};
    this.#watch = Boolean(watch);
    this.#hooks = {
      timeoutMs: this.#timeoutMs,
      open: (request, watch) => this.#openWatch(request, watch),
      mapError: (error, target) => this.#mapError(error, target),
      lost: (stub) => {
        // A later call starts over on a new channel (unless one did already).
        if (this.#stub === stub) this.#reset();
      },
      closed: (watch) => this.#watches.delete(watch),
    };
  }

  /** The socket path in use once connected, else null. */
  get socket() {
    return this.#target ? this.#target.path : null;
  }

  /**
   * Returns a token from the cache or the agent.
   *
   * @param {{identity?: string, lifetime?: number, minValidFor?: number}} [options]
   *   lifetime and minValidFor are in seconds; unset means the agent's defaults.
   * @returns {Promise<Token>}
   */
  async getToken(options = {}) {
    const { identity, lifetime, minValidFor } = options || {};
    checkIdentity(identity);
    const request = {
      identity: identity ?? '',
      lifetime: toDuration(lifetime, 'lifetime'),
      minValidFor: toDuration(minValidFor, 'minValidFor'),
    };
    if (this.#closed) throw new errors.SkykitAgentError('the skykit-agent client is closed');

    const key = JSON.stringify([request.identity, lifetime ?? null]);
    const cached = this.#cache.get(key);
    const now = Date.now();
    if (
      cached &&
      (minValidFor === undefined || minValidFor === null || cached.token.expiresAt.getTime() - now >= minValidFor * 1000)
    ) {
      const refreshAfter = cached.token.refreshAfter.getTime();
      if (now < refreshAfter) return cached.token;
      // A live watch delivers the replacement at refreshAfter.
      if (cached.pushed && this.#feeds.get(key)?.live && now < refreshAfter + PUSH_GRACE_MS) return cached.token;
    }

    const token = await this.#call(request);
    // An answer that crossed a pushed token (e.g. one from a key rotated
    // meanwhile) does not replace a newer or as new one.
    const current = this.#cache.get(key);
    if (!(current?.pushed && this.#feeds.get(key)?.live && current.token.issuedAt >= token.issuedAt)) {
      this.#cache.set(key, { token, pushed: false });
    }
    if (this.#watch && !this.#closed && !this.#feeds.has(key)) this.#startFeed(key, request);
    return token;
  }

  /**
   * Watches the tokens of an identity and lifetime: an async iterator of
   * Tokens, the current one at once, then each replacement as soon as the
   * agent signs it (at its refresh point, or right after a key rotation).
   *
   *   for await (const token of client.watchToken({ lifetime: 600 })) use(token);
   *
   * @param {{identity?: string, lifetime?: number, reconnect?: boolean}} [options]
   *   reconnect: after a first token, watch again when the agent goes away
   *   (backoff 100 ms to 5 s) instead of rejecting with AgentShuttingDownError.
   * @returns {TokenWatch}
   */
  watchToken(options = {}) {
    const { identity, lifetime, reconnect } = options || {};
    checkIdentity(identity);
    const request = { identity: identity ?? '', lifetime: toDuration(lifetime, 'lifetime') };
    return new TokenWatch(this.#hooks, request, { reconnect: Boolean(reconnect) });
  }

  /** Closes the connection to the agent and ends its watches. Later getToken calls fail. */
  close() {
    this.#closed = true;
    for (const watch of [...this.#watches]) watch.close();
    this.#feeds.clear();
    this.#cache.clear();
    this.#reset();
  }

  /** Starts the background watch of a cache key (watch: true). */
  #startFeed(key, { identity, lifetime }) {
    const feed = { live: false, watch: null };
    feed.watch = new TokenWatch(
      this.#hooks,
      { identity, lifetime },
      {
        reconnect: true,
        onState: (up) => {
          feed.live = up;
        },
      },
    );
    this.#feeds.set(key, feed);
    this.#watches.add(feed.watch);
    (async () => {
      try {
        for await (const token of feed.watch) {
          if (this.#feeds.get(key) === feed) this.#cache.set(key, { token, pushed: true });
        }
      } catch {
        // E.g. the identity is gone after a reload, or the first watch
        // failed: getToken caches without the watch, and starts a new one
        // after its next call to the agent.
      } finally {
        feed.live = false;
        feed.watch.close();
        if (this.#feeds.get(key) === feed) this.#feeds.delete(key);
      }
    })();
  }

  async #openWatch(request, watch) {
    if (this.#closed) throw new errors.SkykitAgentError('the skykit-agent client is closed');
    const stub = await this.#connect();
    if (this.#closed) throw new errors.SkykitAgentError('the skykit-agent client is closed');
    if (!watch.closed) this.#watches.add(watch);
    return { call: stub.watchToken(request), stub, target: this.#target };
  }

  #reset() {
    if (this.#stub) this.#stub.close();
    this.#stub = null;
    this.#target = null;
  }

  async #connect() {
    if (this.#stub) return this.#stub;
    if (!this.#connecting) {
      this.#connecting = this.#discover().finally(() => {
        this.#connecting = null;
      });
    }
    return this.#connecting;
  }

  async #discover() {
    const list = candidates(this.#socket, this.#env);
    // A path named by the argument or the environment is tried even when it
    // does not exist (to report why); discovered paths are skipped if absent.
    const named = list.length === 1 && list[0].namedBy !== NAMED_BY_SYSTEM;
    const attempts = [];
    for (const candidate of list) {
      if (!named && !exists(candidate.path)) {
        attempts.push({ ...candidate, reason: 'does not exist' });
        continue;
      }
      try {
        await probe(candidate.path, this.#timeoutMs);
      } catch (error) {
        attempts.push({ ...candidate, reason: describe(error) });
        throw new errors.AgentUnreachableError(attempts, { cause: error });
      }
      if (this.#closed) throw new errors.SkykitAgentError('the skykit-agent client is closed');
      const TokenService = tokenServiceClass();
      // The HTTP/2 authority must be a host name ("localhost"): the agent
      // rejects a path there.
      const options = { 'grpc.default_authority': 'localhost', ...this.#grpcOptions };
      this.#stub = new TokenService(`unix:${path.resolve(candidate.path)}`, grpc.credentials.createInsecure(), options);
      this.#target = candidate;
      return this.#stub;
    }
    throw new errors.AgentUnreachableError(attempts);
  }

  async #call(request) {
    const stub = await this.#connect();
    const target = this.#target;
    let response;
    try {
      response = await new Promise((resolve, reject) => {
        stub.getToken(request, { deadline: Date.now() + this.#timeoutMs }, (error, value) =>
          error ? reject(error) : resolve(value),
        );
      });
    } catch (error) {
      throw await this.#mapError(error, target);
    }
    return fromResponse(response);
  }

  async #mapError(error, target) {
    const grpcCode = error && typeof error.code === 'number' ? error.code : undefined;
    if (grpcCode === undefined) {
      return new errors.SkykitAgentError(error && error.message ? error.message : String(error), { cause: error });
    }
    const details = error.details ?? error.message;
    const info = { code: STATUS_NAMES[grpcCode], grpcCode, details, cause: error };
    switch (grpcCode) {
      case grpc.status.INVALID_ARGUMENT:
        return new errors.InvalidArgumentError(details, info);
      case grpc.status.NOT_FOUND:
        return new errors.NotFoundError(details, info);
      case grpc.status.PERMISSION_DENIED:
        return new errors.PermissionDeniedError(details, info);
      case grpc.status.UNAVAILABLE: {
        // Either the agent said so (it cannot sign), or the connection is
        // gone: look at the socket again to tell which.
        if (target) {
          try {
            await probe(target.path, this.#timeoutMs);
          } catch (probeError) {
            if (this.#target === target) this.#reset();
            return new errors.AgentUnreachableError([{ ...target, reason: describe(probeError) }], { cause: error });
          }
        }
        return new errors.UnavailableError(details, info);
      }
      default:
        return new errors.SkykitAgentError(`the agent answered ${STATUS_NAMES[grpcCode] ?? grpcCode}: ${details}`, info);
    }
  }
}

module.exports = { Client, LOADER_OPTIONS, PROTO_DIR, PROTO_FILE, PUSH_GRACE_MS, tokenServiceClass };
