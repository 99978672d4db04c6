'use strict';

const util = require('node:util');

const REDACTED = '[redacted]';

/**
 * A token from the agent and its times. `.token` is the JWT for
 * `Authorization: Bearer <token>`; util.inspect (console.log), toJSON
 * (JSON.stringify) and toString show "[redacted]" instead, so logging the
 * object does not leak the credential.
 */
class Token {
  #token;

  /**
   * @param {{token: string, issuedAt: Date, expiresAt: Date, refreshAfter: Date,
   *          issuer: string, identity: string, keyId: string}} fields
   */
  constructor(fields) {
    this.#token = fields.token;
    /** When the token was signed (its `iat`). */
    this.issuedAt = fields.issuedAt;
    /** When the token stops being valid (its `exp`). */
    this.expiresAt = fields.expiresAt;
    /** When a caching client should ask the agent again. */
    this.refreshAfter = fields.refreshAfter;
    /** The token's `iss`: the email the public key is registered with. */
    this.issuer = fields.issuer;
    /** The identity that signed the token. */
    this.identity = fields.identity;
    /** The signing key's fingerprint (as printed by `skykit-agent pubkey`). */
    this.keyId = fields.keyId;
    Object.freeze(this);
  }

  /** The JWT (JWS compact serialization). */
  get token() {
    return this.#token;
  }

  /** The fields with the token redacted (what JSON.stringify writes). */
  toJSON() {
    return {
      token: REDACTED,
      issuedAt: this.issuedAt,
      expiresAt: this.expiresAt,
      refreshAfter: this.refreshAfter,
      issuer: this.issuer,
      identity: this.identity,
      keyId: this.keyId,
    };
  }

  toString() {
    return `Token(${REDACTED}, identity=${this.identity}, expiresAt=${isoOrNull(this.expiresAt)})`;
  }

  [util.inspect.custom](depth, options, inspect) {
    const fields = {
      token: REDACTED,
      issuedAt: this.issuedAt,
      expiresAt: this.expiresAt,
      refreshAfter: this.refreshAfter,
      issuer: this.issuer,
      identity: this.identity,
      keyId: this.keyId,
    };
    const show = typeof inspect === 'function' ? inspect : util.inspect;
    return `Token ${show(fields, options)}`;
  }
}

function isoOrNull(date) {
  return date instanceof Date ? date.toISOString() : null;
}

/** A google.protobuf.Timestamp as a Date (millisecond precision), or null. */
function toDate(timestamp) {
  if (!timestamp) return null;
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(Number(timestamp.nanos || 0) / 1e6));
}

/** The Token of a GetTokenResponse (what GetToken and WatchToken send). */
function fromResponse(response) {
  return new Token({
    token: response.token,
    issuedAt: toDate(response.issuedAt),
    expiresAt: toDate(response.expiresAt),
    refreshAfter: toDate(response.refreshAfter),
    issuer: response.issuer,
    identity: response.identity,
    keyId: response.keyId,
  });
}

module.exports = { Token, REDACTED, fromResponse, toDate };
