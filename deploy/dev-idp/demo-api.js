// Demo protected API for m2m-proxy: an OAuth2 resource server that accepts the RS256 JWT
// access tokens issued by idp.js (verified with `jose` against the IdP's JWKS).
//
// It doubles as the upstream of the proxy benchmarks, so the accepted-request path is kept
// lean: verification results are cached per token string (expiry is still checked on every
// request) and the echo/stream handlers do no work beyond what they report.
//
// DEV / TEST ONLY. See README.md in this folder for the environment variables and the
// /__test endpoints.

import * as crypto from 'node:crypto';
import * as http from 'node:http';

import { createRemoteJWKSet, jwtVerify } from 'jose';

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

function fail(message) {
  process.stderr.write(`demo-api: ${message}\n`);
  process.exit(2);
}

const HOST = process.env.DEMO_HOST || '127.0.0.1';
const PORT = process.env.DEMO_PORT ? Number(process.env.DEMO_PORT) : 9500;
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) fail('DEMO_PORT must be a port number');
const ISSUER = process.env.IDP_ISSUER;
if (!ISSUER) fail('IDP_ISSUER is required (e.g. http://127.0.0.1:9400)');
const AUDIENCE = process.env.DEMO_AUDIENCE || 'http://api.demo.local';
const REQUIRED_SCOPE = process.env.DEMO_REQUIRED_SCOPE ?? 'read';

const STREAM_CHUNK = Buffer.alloc(64 * 1024, 0x61); // 64 KiB of 'a', reused for every write
const MAX_STREAM_BYTES = 64 * 1024 ** 3;

// ---------------------------------------------------------------------------------------------
// Discovery and JWKS
// ---------------------------------------------------------------------------------------------

async function discover(issuer) {
  const url = `${issuer.replace(/\/$/, '')}/.well-known/openid-configuration`;
  let lastError;
  // The launcher starts us after the IdP is ready; retry briefly for manual starts anyway.
  for (let attempt = 0; attempt < 50; attempt += 1) {
    try {
      const res = await fetch(url);
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const doc = await res.json();
      if (typeof doc.jwks_uri !== 'string') throw new Error('discovery has no jwks_uri');
      return doc;
    } catch (err) {
      lastError = err;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
  return fail(`discovery at ${url} failed: ${lastError?.message ?? lastError}`);
}

const discovery = await discover(ISSUER);
const JWKS = createRemoteJWKSet(new URL(discovery.jwks_uri));
const VERIFY_OPTIONS = {
  issuer: discovery.issuer,
  audience: AUDIENCE,
  algorithms: ['RS256'],
  typ: 'at+jwt', // RFC 9068 access token
};

// ---------------------------------------------------------------------------------------------
// Token verification with a per-token cache
// ---------------------------------------------------------------------------------------------

const verified = new Map(); // token string -> { payload, scopes: Set, expMs }
const MAX_CACHED = 10_000;
const revoked = new Set(); // jti values
const stats = { accepted: 0, rejected_401: 0, rejected_403: 0 };
let lastAcceptedJti = null;

class AuthError extends Error {
  constructor(status, error, description) {
    super(description);
    this.status = status;
    this.error = error;
  }
}

async function verify(token) {
  let entry = verified.get(token);
  if (entry === undefined) {
    let payload;
    try {
      ({ payload } = await jwtVerify(token, JWKS, VERIFY_OPTIONS));
    } catch (err) {
      throw new AuthError(401, 'invalid_token', `${err.code ?? 'ERR'}: ${err.message}`);
    }
    if (typeof payload.exp !== 'number') {
      throw new AuthError(401, 'invalid_token', 'token has no exp claim');
    }
    entry = {
      payload,
      scopes: new Set(typeof payload.scope === 'string' ? payload.scope.split(' ') : []),
      expMs: payload.exp * 1000,
    };
    if (verified.size >= MAX_CACHED) verified.clear(); // crude bound; fine for a dev server
    verified.set(token, entry);
  }
  // Checked on every request, cached or not.
  if (entry.expMs <= Date.now()) {
    verified.delete(token);
    throw new AuthError(401, 'invalid_token', 'token expired');
  }
  if (revoked.has(entry.payload.jti)) {
    throw new AuthError(401, 'invalid_token', 'token revoked');
  }
  if (REQUIRED_SCOPE && !entry.scopes.has(REQUIRED_SCOPE)) {
    throw new AuthError(403, 'insufficient_scope', `scope "${REQUIRED_SCOPE}" required`);
  }
  return entry.payload;
}

// RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token
const BEARER = /^Bearer +([A-Za-z0-9\-._~+/]+=*) *$/i;

async function authenticate(req) {
  const header = req.headers.authorization;
  if (header === undefined) throw new AuthError(401, null, 'missing bearer token');
  const match = BEARER.exec(header);
  if (!match) {
    if (!/^Bearer(\s|$)/i.test(header)) throw new AuthError(401, null, 'missing bearer token');
    throw new AuthError(401, 'invalid_token', 'malformed bearer token');
  }
  return verify(match[1]);
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

function sendJson(res, status, body, extraHeaders) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(data),
    ...extraHeaders,
  });
  res.end(data);
}

function sendAuthError(res, err) {
  // Missing credentials: bare challenge (RFC 6750 §3.1); otherwise name the error.
  const challenge = err.error ? `Bearer error="${err.error}"` : 'Bearer';
  if (err.status === 401) stats.rejected_401 += 1;
  else stats.rejected_403 += 1;
  sendJson(res, err.status, {
    error: err.error ?? 'unauthorized',
    error_description: err.message,
  }, { 'www-authenticate': challenge });
}

function countAuthorizationLines(rawHeaders) {
  let count = 0;
  for (let i = 0; i < rawHeaders.length; i += 2) {
    if (rawHeaders[i].toLowerCase() === 'authorization') count += 1;
  }
  return count;
}

function stream(req, res, url) {
  req.resume(); // discard any request body
  const raw = url.searchParams.get('bytes') ?? '0';
  const total = Number(raw);
  if (!/^\d+$/.test(raw) || !Number.isSafeInteger(total) || total > MAX_STREAM_BYTES) {
    return sendJson(res, 400, { error: 'bytes must be an integer between 0 and 64 GiB' });
  }
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': total });
  if (req.method === 'HEAD') return res.end();

  let remaining = total;
  const pump = () => {
    while (remaining > 0) {
      const n = Math.min(remaining, STREAM_CHUNK.length);
      remaining -= n;
      const chunk = n === STREAM_CHUNK.length ? STREAM_CHUNK : STREAM_CHUNK.subarray(0, n);
      if (!res.write(chunk)) {
        res.once('drain', pump); // respect backpressure from a slow reader
        return;
      }
    }
    res.end();
  };
  res.on('close', () => { remaining = 0; }); // client went away: stop producing
  return pump();
}

function echo(req, res, payload) {
  const hash = crypto.createHash('sha256');
  let bodyLen = 0;
  req.on('data', (chunk) => {
    bodyLen += chunk.length;
    hash.update(chunk);
  });
  req.on('end', () => {
    const { authorization: _omitted, ...headers } = req.headers;
    sendJson(res, 200, {
      ok: true,
      method: req.method,
      path: req.url,
      client_id: payload.client_id ?? null,
      scope: payload.scope ?? null,
      aud: payload.aud ?? null,
      body_len: bodyLen,
      body_sha256: hash.digest('hex'),
      headers,
      authorization_count: countAuthorizationLines(req.rawHeaders),
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Test controls
// ---------------------------------------------------------------------------------------------

function testEndpoint(req, res) {
  req.resume();
  const path = req.url.split('?', 1)[0];
  if (req.method === 'POST' && path === '/__test/revoke-current') {
    if (lastAcceptedJti === null) return sendJson(res, 409, { error: 'no token accepted yet' });
    revoked.add(lastAcceptedJti);
    return sendJson(res, 200, { revoked: lastAcceptedJti });
  }
  if (req.method === 'GET' && path === '/__test/stats') {
    return sendJson(res, 200, { ...stats, revoked: [...revoked] });
  }
  if (req.method === 'POST' && path === '/__test/reset') {
    stats.accepted = 0;
    stats.rejected_401 = 0;
    stats.rejected_403 = 0;
    revoked.clear();
    verified.clear();
    lastAcceptedJti = null;
    return sendJson(res, 200, { reset: true });
  }
  return sendJson(res, 404, { error: 'not_found' });
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

async function handle(req, res) {
  if (req.url.startsWith('/__test/')) return testEndpoint(req, res);

  let payload;
  try {
    payload = await authenticate(req);
  } catch (err) {
    if (err instanceof AuthError) return sendAuthError(res, err);
    throw err;
  }
  stats.accepted += 1;
  lastAcceptedJti = payload.jti ?? null;

  if ((req.method === 'GET' || req.method === 'HEAD') && req.url.startsWith('/stream')) {
    const url = new URL(req.url, 'http://demo.invalid');
    if (url.pathname === '/stream') return stream(req, res, url);
  }
  return echo(req, res, payload);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    process.stderr.write(`demo-api: ${err?.stack ?? err}\n`);
    if (!res.headersSent) sendJson(res, 500, { error: 'internal_error' });
    else res.destroy();
  });
});
// HTTP keep-alive is on by default; idle connections are kept longer than typical client pool
// timeouts, so the proxy's pool rarely races a server-side close.
server.keepAliveTimeout = 65_000;
server.headersTimeout = 66_000;

server.on('error', (err) => fail(`cannot listen on ${HOST}:${PORT}: ${err.message}`));
await new Promise((resolve) => server.listen(PORT, HOST, resolve));
const { port } = server.address();
const host = HOST.includes(':') ? `[${HOST}]` : HOST;
process.stdout.write(`${JSON.stringify({ event: 'demo_api_ready', url: `http://${host}:${port}` })}\n`);

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
// Started by deploy/dev_stack.py: exit when the launcher's stdin pipe closes (launcher died).
if (process.env.EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
