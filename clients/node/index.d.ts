// Type declarations for skykit-agent-client.

/** Environment variables as read by socket discovery (process.env by default). */
export type Environment = Record<string, string | undefined>;

export interface ClientOptions {
  /**
   * Path of the agent's Unix socket. Unset: $SKYKIT_AGENT_SOCKET, else the
   * first existing of $XDG_RUNTIME_DIR/skykit-agent/agent.sock and
   * /run/skykit-agent/agent.sock.
   */
  socket?: string | null;
  /** Environment for socket discovery. Default: process.env. */
  env?: Environment;
  /** Deadline of each call to the agent (and of each connect), in milliseconds. Default: 10000. */
  timeoutMs?: number;
  /**
   * Extra options for the @grpc/grpc-js client (channel options such as
   * "grpc.keepalive_time_ms", and `interceptors`). "grpc.default_authority"
   * defaults to "localhost".
   */
  grpcOptions?: Record<string, unknown>;
  /**
   * Keep the cache current with background watches: after the first
   * getToken of an (identity, lifetime), a WatchToken stream stays open for
   * it (reconnecting after the agent restarts) and getToken answers from the
   * latest pushed token. While that watch is down, getToken caches as
   * without it. The open stream keeps the process alive: call close() when
   * done. Default: false.
   */
  watch?: boolean;
}

export interface GetTokenOptions {
  /** Identity (an [[identity]] name in the agent's config). Unset or "": the agent's default identity. */
  identity?: string | null;
  /** Token lifetime (exp - iat) in whole seconds, 60..3600. Unset: the identity's default. */
  lifetime?: number | null;
  /** The least time, in seconds, the returned token must stay valid. Unset: 0. */
  minValidFor?: number | null;
}

export interface WatchTokenOptions {
  /** Identity (an [[identity]] name in the agent's config). Unset or "": the agent's default identity. */
  identity?: string | null;
  /** Token lifetime (exp - iat) in whole seconds, 60..3600. Unset: the identity's default. */
  lifetime?: number | null;
  /**
   * After a first token, watch again when the agent goes away (shutdown,
   * lost connection), with backoff from 100 ms to 5 s, instead of rejecting
   * with AgentShuttingDownError. Refusals (NotFoundError,
   * InvalidArgumentError, PermissionDeniedError) still reject. Default: false.
   */
  reconnect?: boolean;
}

/** What Token#toJSON() returns: the fields with the token redacted. */
export interface RedactedToken {
  token: '[redacted]';
  issuedAt: Date | null;
  expiresAt: Date | null;
  refreshAfter: Date | null;
  issuer: string;
  identity: string;
  keyId: string;
}

/**
 * A token and its times. `token` is the JWT; util.inspect, toJSON and
 * toString redact it.
 */
export class Token {
  private constructor();
  /** The JWT, ready for `Authorization: Bearer <token>`. */
  readonly token: string;
  /** When the token was signed (its iat). */
  readonly issuedAt: Date;
  /** When the token stops being valid (its exp). */
  readonly expiresAt: Date;
  /** When a caching client should ask the agent again. */
  readonly refreshAfter: Date;
  /** The token's iss claim: the email the public key is registered with. */
  readonly issuer: string;
  /** The identity that signed the token. */
  readonly identity: string;
  /** The signing key's fingerprint, as printed by `skykit-agent pubkey`. */
  readonly keyId: string;
  toJSON(): RedactedToken;
  toString(): string;
}

/**
 * An async iterator of the tokens the agent pushes for one (identity,
 * lifetime): the current one at once, then each replacement as soon as the
 * agent signs it. `return()` (called by `break` in `for await`) and
 * `close()` cancel the stream.
 */
export class TokenWatch implements AsyncIterableIterator<Token> {
  private constructor();
  /** Whether the watch has ended (close(), return(), an error, or the client closed). */
  readonly closed: boolean;
  /** The next token; `{ done: true }` once the watch is closed. */
  next(): Promise<IteratorResult<Token, undefined>>;
  /** Closes the watch. */
  return(): Promise<IteratorReturnResult<undefined>>;
  /** Closes the watch (cancels the stream); pending and later next() calls give `{ done: true }`. */
  close(): void;
  [Symbol.asyncIterator](): TokenWatch;
}

export class Client {
  constructor(options?: ClientOptions);
  /** The socket path in use once connected, else null. */
  readonly socket: string | null;
  /**
   * A token for the identity: the cached one while the agent's refreshAfter
   * has not passed (and it stays valid for minValidFor), else a new answer
   * from the agent.
   */
  getToken(options?: GetTokenOptions): Promise<Token>;
  /**
   * Watches the tokens of an identity and lifetime. Nothing is sent before
   * the first next(). next() rejects with getToken's errors, and with
   * AgentShuttingDownError when the agent stops (unless `reconnect`).
   */
  watchToken(options?: WatchTokenOptions): TokenWatch;
  /** Closes the connection to the agent and ends its watches; later getToken calls reject. */
  close(): void;
}

/** A socket path to consider, and what named it. */
export interface Candidate {
  path: string;
  namedBy: 'argument' | '$SKYKIT_AGENT_SOCKET' | '$XDG_RUNTIME_DIR' | 'system default';
}

/** A socket path that was tried, and why it did not work. */
export interface Attempt extends Candidate {
  reason: string;
}

/** The ordered socket candidates for an explicit argument and an environment (pure). */
export function candidates(argument?: string | null, env?: Environment): Candidate[];

/** "/run/skykit-agent/agent.sock" */
export const SYSTEM_SOCKET: string;

/** Base class of every error the client raises. */
export class SkykitAgentError extends Error {
  /** The gRPC status name (e.g. "NOT_FOUND") when the agent answered with an error. */
  readonly code: string | undefined;
  /** The gRPC status code number when the agent answered with an error. */
  readonly grpcCode: number | undefined;
  /** The agent's own message when the agent answered with an error. */
  readonly details: string | undefined;
}

/** No agent could be reached; lists every path tried and why. */
export class AgentUnreachableError extends SkykitAgentError {
  readonly attempts: ReadonlyArray<Readonly<Attempt>>;
}

/** INVALID_ARGUMENT: e.g. a lifetime outside 60s..3600s. */
export class InvalidArgumentError extends SkykitAgentError {}

/** NOT_FOUND: the agent has no such identity. */
export class NotFoundError extends SkykitAgentError {}

/** PERMISSION_DENIED: the agent refused this caller. */
export class PermissionDeniedError extends SkykitAgentError {}

/** UNAVAILABLE from the agent itself: it is running but could not sign a token. */
export class UnavailableError extends SkykitAgentError {}

/**
 * A token watch ended because the agent is shutting down or the connection
 * to it was lost (code "UNAVAILABLE"): watch again once it is back.
 */
export class AgentShuttingDownError extends UnavailableError {}
