'use strict';

// The package ships a copy of the repo's proto; it must not be stale.

const assert = require('node:assert/strict');
const fs = require('node:fs');
const { it } = require('node:test');

const { SOURCE, TARGET } = require('../scripts/sync-proto');
const { tokenServiceClass } = require('../lib/client');

it('proto/skykit/agent/v1/agent.proto is an exact copy of the repo proto (else run `npm run sync-proto`)', () => {
  assert.ok(fs.existsSync(SOURCE), `the repo's proto ${SOURCE} is missing`);
  assert.ok(fs.existsSync(TARGET), `the package's proto ${TARGET} is missing: run \`npm run sync-proto\``);
  const same = fs.readFileSync(SOURCE).equals(fs.readFileSync(TARGET));
  assert.ok(same, `${TARGET} is stale: it differs from ${SOURCE}; run \`npm run sync-proto\` in clients/node`);
});

it('the shipped proto loads, with Duration and Timestamp resolved', () => {
  const service = tokenServiceClass().service;
  const method = service.GetToken;
  assert.equal(method.path, '/skykit.agent.v1.TokenService/GetToken');
  const request = method.requestDeserialize(
    method.requestSerialize({ identity: 'x', lifetime: { seconds: 600, nanos: 0 }, minValidFor: { seconds: 60 } }),
  );
  assert.deepEqual(request, { identity: 'x', lifetime: { seconds: 600, nanos: 0 }, minValidFor: { seconds: 60, nanos: 0 } });
  const response = method.responseDeserialize(
    method.responseSerialize({ token: 't', issuedAt: { seconds: 1700000000 }, keyId: 'k' }),
  );
  assert.deepEqual(response.issuedAt, { seconds: 1700000000, nanos: 0 });
  assert.equal(response.keyId, 'k');
  assert.equal(response.expiresAt, null);
});
