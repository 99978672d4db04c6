'use strict';

// Token watches: the agent's WatchToken stream as an async iterator of
// Tokens (Client#watchToken), also used by the watch-backed cache of
// `new Client({ watch: true })`.

const grpc = require('@grpc/grpc-js');

const errors = require('./errors');
const { fromResponse } = require('./token');

/** reconnect: the first pause before watching again, and the longest (ms). */
const BACKOFF = { firstMs: 100, maxMs: 5_000 };

const DONE = Object.freeze({ done: true, value: undefined });

function noop() {}

/**
 * An async iterator of the tokens the agent pushes for one (identity,
 * lifetime): the current token at once, then each replacement as soon as
 * the agent signs it. Made by Client#watchToken; nothing is sent before the
 * first next(). `return()` (what `break` in `for await` calls) and `close()`
 * cancel the stream.
 */
class TokenWatch {
  #hooks;
  #request;
  #reconnect;
  #onState;
  #closed = false;
  #stream = null; // the stream in progress (see #open)
  #established = false; // some stream delivered a token
  #last = null; // the JWT returned last
  #backoffMs = BACKOFF.firstMs;
  #pause = null; // {timer, resolve} while waiting to reconnect
  #chain = Promise.resolve(); // next() calls run one after another

  /**
   * @param {object} hooks the client's side: open(request, watch) -> {call, stub,
   *   target}, mapError(error, target), lost(stub), closed(watch), timeoutMs
   * @param {{identity: string, lifetime: object|null}} request
   * @param {{reconnect?: boolean, onState?: (up: boolean) => void}} [options]
   */
  constructor(hooks, request, { reconnect = false, onState } = {}) {
    this.#hooks = hooks;
    this.#request = request;
    this.#reconnect = Boolean(reconnect);
    this.#onState = onState;
  }

  /** Whether the watch has ended (close(), return(), an error, or the client closed). */
  get closed() {
    return this.#closed;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /** The next token; `{done: true}` once closed. Rejects with the watch's error. */
  next() {
    const result = this.#chain.then(() => this.#next());
    this.#chain = result.then(noop, noop);
    return result;
  }

  /** Closes the watch (cancels the stream); what `break` in `for await` calls. */
  async return() {
    this.close();
    return DONE;
  }

  /** Ends the watch: cancels the stream; a pending and every later next() gives `{done: true}`. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#stream) {
      clearTimeout(this.#stream.timer);
      this.#stream.call.cancel();
    }
    if (this.#pause) {
      clearTimeout(this.#pause.timer);
      this.#pause.resolve();
    }
    this.#hooks.closed(this);
  }

  async #next() {
    for (;;) {
      if (this.#closed) return DONE;
      if (!this.#stream) {
        try {
          await this.#open();
        } catch (error) {
          if (this.#closed) return DONE;
          await this.#retryOrThrow(error);
          continue;
        }
        continue;
      }
      const stream = this.#stream;
      const event = await this.#take(stream);
      if (event.response) {
        if (!stream.streaming) {
          stream.streaming = true;
          clearTimeout(stream.timer);
          this.#established = true;
          this.#state(true);
        }
        this.#backoffMs = BACKOFF.firstMs;
        const token = fromResponse(event.response);
        if (token.token === this.#last) continue; // the same token again, from a new stream
        this.#last = token.token;
        return { done: false, value: token };
      }
      // The stream ended.
      this.#ended(stream);
      if (this.#closed) return DONE;
      if (!event.error) {
        // The agent ended the stream without an error (it does so only if
        // the watched entry goes away).
        if (this.#reconnect) {
          await this.#sleep();
          continue;
        }
        this.close();
        return DONE;
      }
      await this.#retryOrThrow(await this.#failure(stream, event.error));
    }
  }

  async #open() {
    const { call, stub, target } = await this.#hooks.open(this.#request, this);
    const stream = { call, stub, target, events: [], wake: null, streaming: false, timedOut: false, error: null, timer: null };
    const push = (event) => {
      stream.events.push(event);
      if (stream.wake) {
        const wake = stream.wake;
        stream.wake = null;
        wake();
      }
    };
    call.on('data', (response) => push({ response }));
    // grpc-js emits 'error' before the messages still buffered; 'end'
    // follows them, so the error is handed on with 'end'.
    call.on('error', (error) => {
      stream.error = error;
    });
    call.on('end', () => push({ end: true, error: stream.error }));
    this.#stream = stream;
    if (this.#closed) {
      call.cancel();
      return;
    }
    // No deadline: the stream is meant to stay open. The first token's
    // wait is bounded instead.
    stream.timer = setTimeout(() => {
      stream.timedOut = true;
      call.cancel();
    }, this.#hooks.timeoutMs);
  }

  #take(stream) {
    if (stream.events.length > 0) return Promise.resolve(stream.events.shift());
    return new Promise((resolve) => {
      stream.wake = () => resolve(stream.events.shift());
    });
  }

  #ended(stream) {
    clearTimeout(stream.timer);
    if (this.#stream === stream) this.#stream = null;
    if (stream.streaming) this.#state(false);
  }

  #state(up) {
    if (this.#onState) this.#onState(up);
  }

  /** The error a failed stream stands for. */
  async #failure(stream, error) {
    const grpcCode = error.code;
    const details = error.details ?? error.message;
    if (stream.timedOut && !stream.streaming) {
      return new errors.SkykitAgentError(`no token from the agent within ${this.#hooks.timeoutMs} ms`, {
        code: 'DEADLINE_EXCEEDED',
        grpcCode: grpc.status.DEADLINE_EXCEEDED,
        cause: error,
      });
    }
    // CANCELLED without close(): the connection was closed under the
    // stream (the client found the agent gone). Like a lost connection.
    if (stream.streaming && (grpcCode === grpc.status.UNAVAILABLE || grpcCode === grpc.status.CANCELLED)) {
      this.#hooks.lost(stream.stub);
      const message = /shutting down/.test(details)
        ? details
        : `the watch ended: the connection to the agent was lost (${details}); watch again once it is back`;
      return new errors.AgentShuttingDownError(message, {
        code: 'UNAVAILABLE',
        grpcCode: grpc.status.UNAVAILABLE,
        details,
        cause: error,
      });
    }
    return this.#hooks.mapError(error, stream.target);
  }

  /**
   * reconnect after a first token: waits (the caller then tries again).
   * Otherwise, and always for a refusal (NotFoundError,
   * InvalidArgumentError, PermissionDeniedError), ends the watch and throws.
   */
  async #retryOrThrow(failure) {
    const refused =
      failure instanceof errors.NotFoundError ||
      failure instanceof errors.InvalidArgumentError ||
      failure instanceof errors.PermissionDeniedError;
    if (this.#reconnect && this.#established && !refused && !this.#closed) {
      await this.#sleep();
      return;
    }
    this.close();
    throw failure;
  }

  #sleep() {
    const delay = this.#backoffMs * (0.8 + 0.4 * Math.random());
    this.#backoffMs = Math.min(this.#backoffMs * 2, BACKOFF.maxMs);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#pause = null;
        resolve();
      }, delay);
      this.#pause = { timer, resolve };
    });
  }
}

module.exports = { TokenWatch, BACKOFF };
