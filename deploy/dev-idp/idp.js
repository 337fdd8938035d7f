// Local development / test IdP for m2m-proxy, built on the real `oidc-provider` package.
//
// Only the OAuth2 client_credentials grant is enabled. Every token request is resolved to a
// resource server (RFC 8707 resource indicator, the Auth0-style `audience` alias, or the first
// configured resource by default) so that access tokens are always RS256-signed JWTs
// (RFC 9068, typ "at+jwt") with aud, scope, client_id, iat, exp and jti claims.
//
// DEV / TEST ONLY: plain http on loopback, in-memory state, a fresh signing key per start.
// See README.md in this folder for the environment variables and the /__test endpoints.

import * as crypto from 'node:crypto';
import * as http from 'node:http';

// oidc-provider 9 prints "Unsupported runtime. Use Node.js v22.x LTS" at import time on
// Node 20. Everything this dev IdP uses works on Node 20 (verified by the integration
// tests), so drop exactly that one line to keep stderr meaningful. Imported dynamically so
// the filter is in place before the module body runs.
const realWarn = console.warn;
console.warn = (...args) => {
  if (typeof args[0] === 'string' && args[0].includes('Unsupported runtime')) return;
  realWarn(...args);
};
const { default: Provider, errors } = await import('oidc-provider');
console.warn = realWarn;

// ---------------------------------------------------------------------------------------------
// Configuration from the environment
// ---------------------------------------------------------------------------------------------

function fail(message) {
  process.stderr.write(`idp: ${message}\n`);
  process.exit(2);
}

function parseJsonEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === '') return fallback;
  try {
    return JSON.parse(raw);
  } catch (err) {
    return fail(`${name} is not valid JSON: ${err.message}`);
  }
}

function parsePort(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`${name} must be a port number`);
  return port;
}

const HOST = process.env.IDP_HOST || '127.0.0.1';
const PORT = parsePort('IDP_PORT', 9400);
const DEV_SECRET = process.env.DEV_CLIENT_SECRET || 'dev-only-secret';

const SECRET_METHODS = new Set(['client_secret_basic', 'client_secret_post']);
const JWT_METHODS = new Set(['client_secret_jwt', 'private_key_jwt']);
const AUTH_METHODS = new Set([...SECRET_METHODS, ...JWT_METHODS]);
// Client assertion algorithms: HS256 for client_secret_jwt, the others for private_key_jwt.
const CLIENT_AUTH_ALGS = ['HS256', 'RS256', 'PS256', 'ES256'];
const CLIENTS = parseJsonEnv('IDP_CLIENTS', [
  { client_id: 'demo-basic', client_secret: DEV_SECRET, token_endpoint_auth_method: 'client_secret_basic' },
  { client_id: 'demo-post', client_secret: DEV_SECRET, token_endpoint_auth_method: 'client_secret_post' },
]);
if (!Array.isArray(CLIENTS) || CLIENTS.length === 0) fail('IDP_CLIENTS must be a non-empty JSON list');
for (const c of CLIENTS) {
  if (typeof c?.client_id !== 'string') fail('every IDP_CLIENTS entry needs a string client_id');
  c.token_endpoint_auth_method ??= 'client_secret_basic';
  const method = c.token_endpoint_auth_method;
  if (!AUTH_METHODS.has(method)) {
    fail(`client ${c.client_id}: token_endpoint_auth_method must be one of ${[...AUTH_METHODS]}`);
  }
  if (method === 'private_key_jwt') {
    if (c.client_secret !== undefined && typeof c.client_secret !== 'string') {
      fail(`client ${c.client_id}: client_secret must be a string if given`);
    }
    if (c.jwks === null || typeof c.jwks !== 'object' || !Array.isArray(c.jwks.keys)
        || c.jwks.keys.length === 0) {
      fail(`client ${c.client_id}: private_key_jwt needs jwks, a public JWK Set {"keys": [...]}`);
    }
  } else if (typeof c.client_secret !== 'string') {
    fail(`client ${c.client_id}: ${method} needs a string client_secret`);
  }
}

const RESOURCES = parseJsonEnv('IDP_RESOURCES', {
  'http://api.demo.local': { scope: 'read write', ttl_s: 300 },
});
if (RESOURCES === null || typeof RESOURCES !== 'object' || Array.isArray(RESOURCES)
    || Object.keys(RESOURCES).length === 0) {
  fail('IDP_RESOURCES must be a non-empty JSON object');
}
const TTL_OVERRIDE = process.env.IDP_TOKEN_TTL_S ? Number(process.env.IDP_TOKEN_TTL_S) : undefined;
if (TTL_OVERRIDE !== undefined && !(Number.isInteger(TTL_OVERRIDE) && TTL_OVERRIDE > 0)) {
  fail('IDP_TOKEN_TTL_S must be a positive integer');
}
for (const [url, r] of Object.entries(RESOURCES)) {
  if (!URL.canParse(url)) fail(`IDP_RESOURCES key ${url} is not an absolute URL`);
  if (typeof r?.scope !== 'string') fail(`IDP_RESOURCES[${url}].scope must be a string`);
  const ttl = TTL_OVERRIDE ?? r.ttl_s ?? 300;
  if (!(Number.isInteger(ttl) && ttl > 0)) fail(`IDP_RESOURCES[${url}].ttl_s must be a positive integer`);
  r.ttl_s = ttl;
}
const DEFAULT_RESOURCE = Object.keys(RESOURCES)[0];
// Every scope any resource allows; oidc-provider only accepts scopes it knows about.
const ALL_SCOPES = [...new Set(Object.values(RESOURCES).flatMap((r) => r.scope.split(' ')))]
  .filter(Boolean);

// ---------------------------------------------------------------------------------------------
// Minimal in-memory adapter. JWT access tokens are never stored, so this mostly stays empty;
// it exists so oidc-provider does not warn about its quick-start adapter on every start.
// ---------------------------------------------------------------------------------------------

const store = new Map(); // key -> { payload, expiresAt }

class MemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { payload, expiresAt });
  }

  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      store.delete(this.key(id));
      return undefined;
    }
    return entry.payload;
  }

  async findByUserCode() {
    return undefined;
  }

  async findByUid() {
    return undefined;
  }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Token request recording (test visibility)
// ---------------------------------------------------------------------------------------------

const tokenRequests = [];
const MAX_RECORDED = 10_000;

// RFC 6749 Appendix B: client_id / client_secret are form-urlencoded before Basic encoding.
function formDecode(value) {
  return decodeURIComponent(value.replace(/\+/g, ' '));
}

function describeAuthorization(header) {
  if (!header) return { auth_header_scheme: null, basic_client_id: null };
  const [scheme, credentials = ''] = header.trim().split(/\s+/, 2);
  const lower = scheme.toLowerCase();
  if (lower !== 'basic') return { auth_header_scheme: lower, basic_client_id: null };
  let clientId = null;
  try {
    const decoded = Buffer.from(credentials, 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon >= 0) clientId = formDecode(decoded.slice(0, colon));
  } catch {
    clientId = null; // malformed percent-encoding: record the scheme only
  }
  return { auth_header_scheme: 'basic', basic_client_id: clientId };
}

// Decoded (NOT verified) view of a client_assertion JWT for the record; oidc-provider does the
// real verification. Returns nulls when there is no assertion or it is not a decodable JWT.
function describeAssertion(assertion) {
  const none = { assertion_header: null, assertion_claims: null };
  if (typeof assertion !== 'string') return none;
  const parts = assertion.split('.');
  if (parts.length !== 3) return none;
  const decode = (part) => {
    try {
      const value = JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
      return value !== null && typeof value === 'object' && !Array.isArray(value) ? value : null;
    } catch {
      return null;
    }
  };
  return { assertion_header: decode(parts[0]), assertion_claims: decode(parts[1]) };
}

// ---------------------------------------------------------------------------------------------
// Provider
// ---------------------------------------------------------------------------------------------

// Which client authentication method a token request used: a client_assertion means one of
// the JWT methods (HS* assertion = client_secret_jwt, anything else = private_key_jwt), a
// client_secret form field means client_secret_post, otherwise Basic.
function usedAuthMethod(body) {
  if (body?.client_assertion !== undefined) {
    const alg = describeAssertion(body.client_assertion).assertion_header?.alg;
    return typeof alg === 'string' && alg.startsWith('HS') ? 'client_secret_jwt' : 'private_key_jwt';
  }
  return body?.client_secret !== undefined ? 'client_secret_post' : 'client_secret_basic';
}

// oidc-provider accepts client_secret_basic and client_secret_post interchangeably for any
// secret-based client. Real IdPs (Auth0, Okta, Entra) enforce the registered method, and the
// proxy's auth_method setting is only testable if this one does too. oidc-provider already
// enforces the JWT methods itself (method family and assertion alg); this check repeats that
// for every registered method. Runs during the grant, i.e. after oidc-provider authenticated
// the client (see resourceServerInfo).
function enforceRegisteredAuthMethod(ctx) {
  const registered = ctx.oidc.client?.clientAuthMethod;
  if (!AUTH_METHODS.has(registered)) return;
  const used = usedAuthMethod(ctx.oidc.body);
  if (used !== registered) {
    const err = new errors.InvalidClientAuth(); // 401 invalid_client, like a bad secret
    err.error_description = `client authentication failed: client is registered for ${registered}`
      + `, request used ${used}`;
    throw err;
  }
}

function resourceServerInfo(ctx, indicator) {
  // Every client_credentials grant resolves exactly one resource (defaultResource never
  // returns undefined), so this is the per-grant hook for the auth method check.
  enforceRegisteredAuthMethod(ctx);
  const resource = RESOURCES[indicator];
  if (!resource) throw new errors.InvalidTarget(`unknown resource ${indicator}`);
  // Strict per-resource scope check: oidc-provider alone would silently drop scopes the
  // resource does not allow; a dev IdP that answers invalid_scope is more useful for tests.
  const allowed = new Set(resource.scope.split(' '));
  for (const scope of (ctx.oidc.params.scope ?? '').split(' ').filter(Boolean)) {
    if (!allowed.has(scope)) {
      throw new errors.InvalidScope('requested scope is not allowed for this resource', scope);
    }
  }
  return {
    scope: resource.scope,
    audience: indicator,
    accessTokenTTL: resource.ttl_s,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
}

const CLIENT_METADATA = CLIENTS.map((c) => ({
  client_id: c.client_id,
  ...(c.client_secret !== undefined && { client_secret: c.client_secret }),
  ...(c.jwks !== undefined && { jwks: c.jwks }),
  token_endpoint_auth_method: c.token_endpoint_auth_method,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
}));

async function buildProvider(issuer) {
  // Fresh RSA signing key per start: nothing secret is committed, tokens die with the IdP.
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = {
    ...privateKey.export({ format: 'jwk' }),
    kid: crypto.randomUUID(),
    alg: 'RS256',
    use: 'sig',
  };

  const provider = new Provider(issuer, {
    adapter: MemoryAdapter,
    clients: CLIENT_METADATA,
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ALL_SCOPES,
    clientBasedCORS: () => false,
    clientAuthMethods: [...AUTH_METHODS],
    enabledJWA: { clientAuthSigningAlgValues: CLIENT_AUTH_ALGS },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Called only when the request carries no `resource` parameter. Auth0-style
        // `audience` is treated as an alias for `resource` here (it is read from the body
        // oidc-provider already parsed, so no second body parser is needed); otherwise the
        // first IDP_RESOURCES key is used, so a bare request still yields a JWT.
        defaultResource(ctx) {
          const audience = ctx.oidc.body?.audience;
          if (typeof audience === 'string' && audience !== '') return audience;
          return DEFAULT_RESOURCE;
        },
        useGrantedResource: () => true,
        getResourceServerInfo: resourceServerInfo,
      },
    },
    ttl: {
      ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 300,
    },
  });

  // Record every token endpoint request. This middleware never reads the request stream:
  // it captures the headers up front and, once oidc-provider has parsed the urlencoded body
  // itself, records that parsed form (ctx.oidc.body). Nothing is consumed twice.
  const tokenPath = provider.pathFor('token');
  provider.use(async (ctx, next) => {
    if (ctx.path !== tokenPath) return next();
    const record = {
      time: new Date().toISOString(),
      method: ctx.method,
      content_type: ctx.get('content-type') || null,
      ...describeAuthorization(ctx.get('authorization')),
      form: null,
      assertion_header: null,
      assertion_claims: null,
      status: null,
    };
    if (tokenRequests.length >= MAX_RECORDED) tokenRequests.shift();
    tokenRequests.push(record);
    try {
      await next();
    } finally {
      const form = ctx.oidc?.body;
      record.form = form ? { ...form } : null;
      Object.assign(record, describeAssertion(form?.client_assertion));
      record.status = ctx.status;
    }
  });

  // oidc-provider validates static clients lazily (first token request); validate them now so
  // a bad IDP_CLIENTS entry (e.g. a private key in jwks) fails the start with a clear message.
  for (const metadata of CLIENT_METADATA) {
    try {
      await provider.Client.validate(metadata);
    } catch (err) {
      fail(`client ${metadata.client_id}: ${err.error_description ?? err.message}`);
    }
  }

  provider.on('server_error', (_ctx, err) => {
    process.stderr.write(`idp: server_error: ${err?.stack ?? err}\n`);
  });

  return provider;
}

// ---------------------------------------------------------------------------------------------
// HTTP server: /__test/* handled here, everything else goes to oidc-provider
// ---------------------------------------------------------------------------------------------

function sendJson(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(data),
    'cache-control': 'no-store',
  });
  res.end(data);
}

function testEndpoint(req, res) {
  const path = req.url.split('?', 1)[0];
  req.resume(); // test endpoints ignore request bodies
  if (req.method === 'GET' && path === '/__test/token-requests') {
    return sendJson(res, 200, tokenRequests);
  }
  if (req.method === 'POST' && path === '/__test/reset') {
    tokenRequests.length = 0;
    return sendJson(res, 200, { reset: true });
  }
  return sendJson(res, 404, { error: 'not_found' });
}

const server = http.createServer();
server.keepAliveTimeout = 65_000;
server.headersTimeout = 66_000;

server.on('error', (err) => fail(`cannot listen on ${HOST}:${PORT}: ${err.message}`));
await new Promise((resolve) => server.listen(PORT, HOST, resolve));

// The issuer needs the real port, so the provider is built only after listen() (IDP_PORT=0).
const { port } = server.address();
const issuer = `http://${HOST.includes(':') ? `[${HOST}]` : HOST}:${port}`;
const provider = await buildProvider(issuer);
const providerCallback = provider.callback();

server.on('request', (req, res) => {
  if (req.url.startsWith('/__test/')) return testEndpoint(req, res);
  return providerCallback(req, res);
});

// Read the token endpoint from our own discovery document: proves discovery works before we
// announce readiness, and reports the real path rather than an assumed one.
const discovery = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
process.stdout.write(`${JSON.stringify({
  event: 'idp_ready',
  issuer,
  token_url: discovery.token_endpoint,
})}\n`);

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
// When started by deploy/dev_stack.py, stdin is a pipe from the launcher: if the launcher
// dies without stopping us, the pipe closes and we exit instead of holding the port.
if (process.env.EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
