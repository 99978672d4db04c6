'use strict';

/**
 * Errors of the skykit-agent client. Every error the client raises is a
 * SkykitAgentError; the subclasses name the cases a caller may handle.
 */

const MESSAGE_HINT =
  'start the agent (`skykit-agent serve`, or `systemctl start skykit-agent`), ' +
  'or name its socket with the `socket` option or $SKYKIT_AGENT_SOCKET';

/** Base class of every error the client raises. */
class SkykitAgentError extends Error {
  /**
   * @param {string} message
   * @param {{code?: string, grpcCode?: number, details?: string, cause?: unknown}} [info]
   */
  constructor(message, info = {}) {
    super(message, info.cause === undefined ? undefined : { cause: info.cause });
    this.name = new.target.name;
    /** The gRPC status name (e.g. "NOT_FOUND") when the agent answered with an error. */
    this.code = info.code;
    /** The gRPC status code number when the agent answered with an error. */
    this.grpcCode = info.grpcCode;
    /** The agent's own message, when the agent answered with an error. */
    this.details = info.details;
  }
}

/**
 * No agent could be reached. `attempts` lists each socket path tried, what
 * named it, and why it did not work; the message lists them too.
 */
class AgentUnreachableError extends SkykitAgentError {
  /** @param {{path: string, namedBy: string, reason: string}[]} attempts */
  constructor(attempts, info = {}) {
    const lines = attempts.map((a) => `\n  ${a.path} (${a.namedBy}): ${a.reason}`).join('');
    super(`cannot reach skykit-agent; tried:${lines}\n${MESSAGE_HINT}`, info);
    this.attempts = attempts.map((a) => Object.freeze({ ...a }));
  }
}

/** The agent rejected the request's arguments (INVALID_ARGUMENT), e.g. a lifetime outside 60s..3600s. */
class InvalidArgumentError extends SkykitAgentError {}

/** The agent has no such identity (NOT_FOUND). */
class NotFoundError extends SkykitAgentError {}

/** The agent refused this caller (PERMISSION_DENIED). */
class PermissionDeniedError extends SkykitAgentError {}

/** The agent is running but could not issue a token (UNAVAILABLE from the agent itself, e.g. signing failed). */
class UnavailableError extends SkykitAgentError {}

/**
 * A token watch ended because the agent went away: it is shutting down (it
 * ended the stream with UNAVAILABLE, "reconnect and watch again") or the
 * connection to it was lost. `code` is "UNAVAILABLE". Watch again once the
 * agent is back (`watchToken({ reconnect: true })` does this itself).
 */
class AgentShuttingDownError extends UnavailableError {}

module.exports = {
  SkykitAgentError,
  AgentUnreachableError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  UnavailableError,
  AgentShuttingDownError,
};
