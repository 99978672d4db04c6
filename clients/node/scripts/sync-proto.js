#!/usr/bin/env node
'use strict';

// Copies the repo's proto (proto/skykit/agent/v1/agent.proto at the repo
// root) into this package (proto/...), which ships it. Run after changing
// the proto: `npm run sync-proto`. test/proto.test.js fails when the copy
// is stale.

const fs = require('node:fs');
const path = require('node:path');

const RELATIVE = path.join('skykit', 'agent', 'v1', 'agent.proto');
const SOURCE = path.join(__dirname, '..', '..', '..', 'proto', RELATIVE);
const TARGET = path.join(__dirname, '..', 'proto', RELATIVE);

function main() {
  if (!fs.existsSync(SOURCE)) {
    console.error(`sync-proto: ${SOURCE} does not exist (run this inside the skykit-agent repo)`);
    process.exit(1);
  }
  const source = fs.readFileSync(SOURCE);
  const current = fs.existsSync(TARGET) ? fs.readFileSync(TARGET) : null;
  if (current && current.equals(source)) {
    console.log(`sync-proto: ${path.relative(process.cwd(), TARGET)} is up to date`);
    return;
  }
  fs.mkdirSync(path.dirname(TARGET), { recursive: true });
  fs.writeFileSync(TARGET, source);
  console.log(`sync-proto: copied ${SOURCE} to ${TARGET}`);
}

if (require.main === module) main();

module.exports = { SOURCE, TARGET };
