'use strict';

// The tests need the real agent: this fails (never skips) when
// SKYKIT_AGENT_BIN is unset or not an executable, and checks it runs.

const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const { it } = require('node:test');

const { agentBin } = require('./helpers');

it('SKYKIT_AGENT_BIN names the skykit-agent binary', () => {
  const bin = agentBin();
  const version = execFileSync(bin, ['--version'], { encoding: 'utf8' });
  assert.match(version, /skykit-agent/);
});
