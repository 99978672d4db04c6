'use strict';

/**
 * skykit-agent-client: get Skykit API access tokens from the local
 * skykit-agent over its Unix socket.
 *
 *   const { Client } = require('skykit-agent-client');
 *   const client = new Client();
 *   const { token } = await client.getToken();
 *   for await (const token of client.watchToken()) { ... }
 */

const { Client } = require('./lib/client');
const { candidates, SYSTEM_SOCKET } = require('./lib/discovery');
const { Token } = require('./lib/token');
const { TokenWatch } = require('./lib/watch');
const errors = require('./lib/errors');

module.exports = {
  Client,
  Token,
  TokenWatch,
  candidates,
  SYSTEM_SOCKET,
  ...errors,
};
