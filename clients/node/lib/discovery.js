'use strict';

/**
 * Socket discovery, the rule every skykit-agent client follows:
 * the explicit argument, else $SKYKIT_AGENT_SOCKET, else the first EXISTING
 * of $XDG_RUNTIME_DIR/skykit-agent/agent.sock and /run/skykit-agent/agent.sock.
 * An empty value counts as unset. Clients never read the agent's config.
 */

const path = require('node:path');

const ENV_SOCKET = 'SKYKIT_AGENT_SOCKET';
const ENV_XDG_RUNTIME_DIR = 'XDG_RUNTIME_DIR';
const SYSTEM_SOCKET = '/run/skykit-agent/agent.sock';

const NAMED_BY_ARGUMENT = 'argument';
const NAMED_BY_ENV = '$SKYKIT_AGENT_SOCKET';
const NAMED_BY_XDG = '$XDG_RUNTIME_DIR';
const NAMED_BY_SYSTEM = 'system default';

function nonEmpty(value) {
  return typeof value === 'string' && value !== '' ? value : undefined;
}

/**
 * The ordered socket paths to consider, each with what named it. Pure: it
 * reads only its arguments (no file system, no process.env).
 *
 * A single candidate named by the argument or $SKYKIT_AGENT_SOCKET is tried
 * whether or not it exists; the discovered ones (XDG, system) are tried in
 * order, skipping those that do not exist.
 *
 * @param {string | null | undefined} argument the explicit socket path
 * @param {Record<string, string | undefined>} [env] environment (default: process.env)
 * @returns {{path: string, namedBy: string}[]}
 */
function candidates(argument, env = process.env) {
  const explicit = nonEmpty(argument);
  if (explicit !== undefined) {
    return [{ path: explicit, namedBy: NAMED_BY_ARGUMENT }];
  }
  const fromEnv = nonEmpty(env[ENV_SOCKET]);
  if (fromEnv !== undefined) {
    return [{ path: fromEnv, namedBy: NAMED_BY_ENV }];
  }
  const list = [];
  const xdg = nonEmpty(env[ENV_XDG_RUNTIME_DIR]);
  if (xdg !== undefined) {
    list.push({ path: path.join(xdg, 'skykit-agent', 'agent.sock'), namedBy: NAMED_BY_XDG });
  }
  list.push({ path: SYSTEM_SOCKET, namedBy: NAMED_BY_SYSTEM });
  return list;
}

module.exports = {
  candidates,
  ENV_SOCKET,
  ENV_XDG_RUNTIME_DIR,
  SYSTEM_SOCKET,
  NAMED_BY_ARGUMENT,
  NAMED_BY_ENV,
  NAMED_BY_XDG,
  NAMED_BY_SYSTEM,
};
