'use strict';

// Type-checks index.d.ts against test/types/usage.ts with TypeScript (a
// pinned devDependency; `npm ci` installs it).

const assert = require('node:assert/strict');
const { spawnSync } = require('node:child_process');
const path = require('node:path');
const { it } = require('node:test');

it('index.d.ts type-checks against test/types/usage.ts (tsc --noEmit)', () => {
  let tsc;
  try {
    tsc = require.resolve('typescript/bin/tsc');
  } catch {
    throw new Error('typescript is not installed: run `npm ci` in clients/node (it is a pinned devDependency)');
  }
  const run = spawnSync(process.execPath, [tsc, '-p', path.join(__dirname, 'types', 'tsconfig.json')], {
    encoding: 'utf8',
    timeout: 60_000,
  });
  assert.equal(run.error, undefined);
  assert.equal(run.status, 0, `tsc failed:\n${run.stdout}${run.stderr}`);
});
