// Compiled (not run) by test/types.test.js with `tsc --noEmit`: checks that
// index.d.ts describes the API as documented. Lines marked @ts-expect-error
// must NOT type-check.

import {
  Client,
  Token,
  candidates,
  Candidate,
  SkykitAgentError,
  AgentUnreachableError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  UnavailableError,
  AgentShuttingDownError,
  TokenWatch,
  SYSTEM_SOCKET,
} from 'skykit-agent-client';

async function use(): Promise<string> {
  const client = new Client({ socket: '/run/skykit-agent/agent.sock', timeoutMs: 5000 });
  const plain = new Client();
  const fromEnv = new Client({ env: { XDG_RUNTIME_DIR: '/run/user/1000' } });
  const token: Token = await client.getToken({ identity: 'default', lifetime: 600, minValidFor: 60 });
  const jwt: string = token.token;
  const times: Date[] = [token.issuedAt, token.expiresAt, token.refreshAfter];
  const names: string[] = [token.issuer, token.identity, token.keyId];
  const redacted: '[redacted]' = token.toJSON().token;
  const socket: string | null = client.socket;
  await plain.getToken();
  await fromEnv.getToken({});

  // @ts-expect-error lifetime is a number of seconds
  await client.getToken({ lifetime: '600s' });
  // @ts-expect-error unknown option
  await client.getToken({ lifetimeSeconds: 600 });
  // @ts-expect-error the token is read-only
  token.token = 'x';

  const watching = new Client({ socket: '/run/skykit-agent/agent.sock', watch: true });
  await watching.getToken();
  const watch: TokenWatch = client.watchToken({ identity: 'default', lifetime: 600, reconnect: true });
  for await (const pushed of watch) {
    const pushedJwt: string = pushed.token;
    if (pushedJwt) break;
  }
  const step: IteratorResult<Token, undefined> = await client.watchToken().next();
  if (!step.done) {
    const value: Token = step.value;
    void value;
  }
  const ended: boolean = watch.closed;
  watch.close();
  await watch.return();
  const iterable: AsyncIterable<Token> = client.watchToken({});
  void iterable;
  void ended;
  // @ts-expect-error a watch has no minValidFor
  client.watchToken({ minValidFor: 60 });
  // @ts-expect-error reconnect is a boolean
  client.watchToken({ reconnect: 'yes' });
  try {
    await watch.next();
  } catch (error) {
    if (error instanceof AgentShuttingDownError) {
      const unavailable: UnavailableError = error;
      void unavailable;
    }
  }

  const list: Candidate[] = candidates(null, { SKYKIT_AGENT_SOCKET: '/tmp/agent.sock' });
  const first: string = list[0].path;
  const namedBy: Candidate['namedBy'] = list[0].namedBy;
  const system: string = SYSTEM_SOCKET;

  try {
    await client.getToken();
  } catch (error) {
    if (error instanceof AgentUnreachableError) {
      const reasons: string[] = error.attempts.map((a) => `${a.path} (${a.namedBy}): ${a.reason}`);
      return reasons.join('\n');
    }
    if (
      error instanceof InvalidArgumentError ||
      error instanceof NotFoundError ||
      error instanceof PermissionDeniedError ||
      error instanceof UnavailableError
    ) {
      const base: SkykitAgentError = error;
      const code: string | undefined = base.code;
      return `${code}: ${base.message} ${base.details ?? ''} ${base.grpcCode ?? ''}`;
    }
    throw error;
  } finally {
    client.close();
  }
  return [jwt, socket, first, namedBy, system, redacted, ...names, ...times.map((t) => t.toISOString())].join();
}

void use;
