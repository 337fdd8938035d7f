// Local development / test IdP for m2m-proxy, built on the real `oidc-provider` package.
//
// Only the OAuth2 client_credentials grant is enabled. Every token request is resolved to a
// resource server (RFC 8707 resource indicator, the Auth0-style `audience` alias, or the first
// configured resource by default) so that access tokens are always RS256-signed JWTs
// (RFC 9068, typ "at+jwt") with aud, scope, client_id, iat, exp and jti claims.
//
// DEV / TEST ONLY: plain http on loopback (or https with test certificates, see "mTLS"
// below), in-memory state, a fresh signing key per start.
// See README.md in this folder for the environment variables and the /__test endpoints.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';

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

function readFileEnv(name) {
  const path = process.env[name];
  if (path === undefined || path === '') return undefined;
  try {
    return fs.readFileSync(path);
  } catch (err) {
    return fail(`${name}: cannot read ${path}: ${err.message}`);
  }
}

const HOST = process.env.IDP_HOST || '127.0.0.1';
const PORT = parsePort('IDP_PORT', 9400);
const DEV_SECRET = process.env.DEV_CLIENT_SECRET || 'dev-only-secret';

// TLS / mTLS (RFC 8705), test only: with a server certificate and key the main listener is
// https, and a second https listener (IDP_MTLS_PORT) asks for client certificates.
const TLS_CERT = readFileEnv('IDP_TLS_CERT_FILE');
const TLS_KEY = readFileEnv('IDP_TLS_KEY_FILE');
const TLS_CLIENT_CA = readFileEnv('IDP_TLS_CLIENT_CA_FILE');
if ((TLS_CERT === undefined) !== (TLS_KEY === undefined)) {
  fail('IDP_TLS_CERT_FILE and IDP_TLS_KEY_FILE must be set together');
}
const TLS = TLS_CERT !== undefined;
if (!TLS && TLS_CLIENT_CA !== undefined) fail('IDP_TLS_CLIENT_CA_FILE needs IDP_TLS_CERT_FILE');
if (!TLS && process.env.IDP_MTLS_PORT) fail('IDP_MTLS_PORT needs IDP_TLS_CERT_FILE');
const MTLS_PORT = parsePort('IDP_MTLS_PORT', 0);

const SECRET_METHODS = new Set(['client_secret_basic', 'client_secret_post']);
const JWT_METHODS = new Set(['client_secret_jwt', 'private_key_jwt']);
const TLS_METHODS = new Set(['tls_client_auth', 'self_signed_tls_client_auth']);
const AUTH_METHODS = new Set([...SECRET_METHODS, ...JWT_METHODS, ...TLS_METHODS]);
// tls_client_auth: exactly one of these names the expected certificate subject.
const TLS_SUBJECT_FIELDS = [
  'tls_client_auth_subject_dn',
  'tls_client_auth_san_dns',
  'tls_client_auth_san_ip',
  'tls_client_auth_san_uri',
  'tls_client_auth_san_email',
];
// Client assertion algorithms: HS256 for client_secret_jwt, the others for private_key_jwt.
const CLIENT_AUTH_ALGS = ['HS256', 'RS256', 'PS256', 'ES256'];
const CLIENTS = parseJsonEnv('IDP_CLIENTS', [
  { client_id: 'demo-basic', client_secret: DEV_SECRET, token_endpoint_auth_method: 'client_secret_basic' },
  { client_id: 'demo-post', client_secret: DEV_SECRET, token_endpoint_auth_method: 'client_secret_post' },
]);
if (!Array.isArray(CLIENTS) || CLIENTS.length === 0) fail('IDP_CLIENTS must be a non-empty JSON list');
const hasJwks = (c) => c.jwks !== null && typeof c.jwks === 'object' && Array.isArray(c.jwks.keys)
  && c.jwks.keys.length > 0;
for (const c of CLIENTS) {
  if (typeof c?.client_id !== 'string') fail('every IDP_CLIENTS entry needs a string client_id');
  c.token_endpoint_auth_method ??= 'client_secret_basic';
  const method = c.token_endpoint_auth_method;
  if (!AUTH_METHODS.has(method)) {
    fail(`client ${c.client_id}: token_endpoint_auth_method must be one of ${[...AUTH_METHODS]}`);
  }
  if (!TLS && (TLS_METHODS.has(method) || c.tls_client_certificate_bound_access_tokens)) {
    fail(`client ${c.client_id}: ${TLS_METHODS.has(method) ? method
      : 'tls_client_certificate_bound_access_tokens'} needs IDP_TLS_CERT_FILE and IDP_TLS_KEY_FILE`);
  }
  if (c.tls_client_certificate_bound_access_tokens !== undefined
      && typeof c.tls_client_certificate_bound_access_tokens !== 'boolean') {
    fail(`client ${c.client_id}: tls_client_certificate_bound_access_tokens must be a boolean`);
  }
  if (method === 'private_key_jwt' || TLS_METHODS.has(method)) {
    // No secret needed; one given anyway is kept (and can be rotated) but never used.
    if (c.client_secret !== undefined && typeof c.client_secret !== 'string') {
      fail(`client ${c.client_id}: client_secret must be a string if given`);
    }
  } else if (typeof c.client_secret !== 'string') {
    fail(`client ${c.client_id}: ${method} needs a string client_secret`);
  }
  if (method === 'private_key_jwt' && !hasJwks(c)) {
    fail(`client ${c.client_id}: private_key_jwt needs jwks, a public JWK Set {"keys": [...]}`);
  }
  if (method === 'self_signed_tls_client_auth'
      && !(hasJwks(c) && c.jwks.keys.some((k) => Array.isArray(k?.x5c) && k.x5c.length > 0))) {
    fail(`client ${c.client_id}: self_signed_tls_client_auth needs jwks {"keys": [...]} with the`
      + ' public key and x5c (the self-signed certificate, base64 DER)');
  }
  const subjects = TLS_SUBJECT_FIELDS.filter((f) => c[f] !== undefined);
  if (subjects.some((f) => typeof c[f] !== 'string' || c[f] === '')) {
    fail(`client ${c.client_id}: ${subjects.join(', ')} must be non-empty strings`);
  }
  if (method === 'tls_client_auth' && subjects.length !== 1) {
    fail(`client ${c.client_id}: tls_client_auth needs exactly one of ${TLS_SUBJECT_FIELDS}`);
  }
  if (method !== 'tls_client_auth' && subjects.length > 0) {
    fail(`client ${c.client_id}: ${subjects[0]} is only for tls_client_auth`);
  }
  if (c.tls_client_auth_subject_dn !== undefined && canonicalDn(c.tls_client_auth_subject_dn) === null) {
    fail(`client ${c.client_id}: tls_client_auth_subject_dn is not a DN like "CN=svc,O=Example"`);
  }
}
if (!TLS_CLIENT_CA && CLIENTS.some((c) => c.token_endpoint_auth_method === 'tls_client_auth')) {
  fail('tls_client_auth clients need IDP_TLS_CLIENT_CA_FILE (the CA their certificates chain to)');
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
// Minimal in-memory adapter. JWT access tokens are never stored, so apart from the clients
// (below) this mostly stays empty; it also keeps oidc-provider from warning about its
// quick-start adapter on every start.
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
    // Client metadata is handed out as a copy: the stored object is only ever replaced whole
    // (secret rotation), never changed in place by whoever read it.
    return this.model === 'Client' ? structuredClone(entry.payload) : entry.payload;
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
// mTLS client certificates (RFC 8705), the features.mTLS helpers
// ---------------------------------------------------------------------------------------------

// Sockets of the mTLS listener. Only that listener asks for a client certificate, so only
// requests on it have one; on the main listener tls_client_auth fails like a missing secret.
const mtlsSockets = new WeakSet();
const peerCertificates = new WeakMap(); // socket -> X509Certificate | null

function peerCertificate(ctx) {
  const socket = ctx.req.socket;
  if (!mtlsSockets.has(socket)) return undefined;
  if (!peerCertificates.has(socket)) {
    const { raw } = socket.getPeerCertificate(); // {} when the client sent no certificate
    peerCertificates.set(socket, raw ? new crypto.X509Certificate(raw) : null);
  }
  return peerCertificates.get(socket) ?? undefined;
}

// The certificate subject as an RFC 4514 string: RDNs most specific first, comma-separated,
// OpenSSL's short attribute names ("CN=svc-mtls,O=Example,C=DE"). Node's X509Certificate
// subject is OpenSSL's multi-line form in encoding order (least specific first) with values
// already escaped per RFC 2253; multi-valued RDNs come as "A=x + B=y".
function subjectDn(cert) {
  return cert.subject.split('\n').filter(Boolean).reverse().join(',').replace(/ \+ /g, '+');
}

// Canonical form of an RFC 4514 DN for comparison: attribute types upper-cased, spaces around
// "=", "," and "+" dropped, the attributes of a multi-valued RDN sorted. Values are compared
// exactly (case-sensitive); backslash escapes are kept as written. null if not a DN.
function canonicalDn(dn) {
  const rdns = [];
  let rdn = [];
  let ava = '';
  const flush = () => {
    const eq = ava.indexOf('=');
    if (eq <= 0) return false;
    const type = ava.slice(0, eq).trim().toUpperCase();
    const value = ava.slice(eq + 1).replace(/^ +/, '').replace(/(?<!\\) +$/, '');
    if (type === '') return false;
    rdn.push(`${type}=${value}`);
    ava = '';
    return true;
  };
  for (let i = 0; i < dn.length; i += 1) {
    const ch = dn[i];
    if (ch === '\\' && i + 1 < dn.length) {
      ava += ch + dn[i + 1];
      i += 1;
    } else if (ch === ',' || ch === '+') {
      if (!flush()) return null;
      if (ch === ',') {
        rdns.push(rdn.sort().join('+'));
        rdn = [];
      }
    } else {
      ava += ch;
    }
  }
  if (!flush()) return null;
  rdns.push(rdn.sort().join('+'));
  return rdns.join(',');
}

// Subject alternative names by type ("DNS", "IP Address", "URI", "email"). Node lists them as
// "DNS:a.example, IP Address:127.0.0.1" and JSON-quotes values with special characters.
function subjectAltNames(cert) {
  const names = new Map();
  const re = /([A-Za-z ]+):("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)/g;
  for (const [, type, raw] of (cert.subjectAltName ?? '').matchAll(re)) {
    let value = raw;
    if (raw.startsWith('"')) {
      try {
        value = JSON.parse(raw);
      } catch {
        continue;
      }
    }
    if (!names.has(type)) names.set(type, []);
    names.get(type).push(value);
  }
  return names;
}

function normalizeIp(ip) {
  return ip.includes(':') ? (URL.parse(`http://[${ip}]/`)?.hostname ?? ip) : ip;
}

const SAN_MATCHERS = {
  tls_client_auth_san_dns: ['DNS', (a, b) => a.toLowerCase() === b.toLowerCase()],
  tls_client_auth_san_ip: ['IP Address', (a, b) => normalizeIp(a) === normalizeIp(b)],
  tls_client_auth_san_uri: ['URI', (a, b) => a === b],
  tls_client_auth_san_email: ['email', (a, b) => a === b],
};

const MTLS_FEATURE = {
  enabled: true,
  tlsClientAuth: true,
  selfSignedTlsClientAuth: true,
  certificateBoundAccessTokens: true,
  // PEM of the client certificate, only for requests on the mTLS listener.
  getCertificate: (ctx) => peerCertificate(ctx)?.toString(),
  // tls_client_auth only: the chain verified against IDP_TLS_CLIENT_CA_FILE. Without that file
  // Node would verify against its public roots, so then nothing counts as authorized.
  certificateAuthorized: (ctx) => TLS_CLIENT_CA !== undefined && mtlsSockets.has(ctx.req.socket)
    && ctx.req.socket.authorized === true,
  certificateSubjectMatches(ctx, property, expected) {
    const cert = peerCertificate(ctx);
    if (!cert) return false;
    if (property === 'tls_client_auth_subject_dn') {
      const want = canonicalDn(expected);
      return want !== null && canonicalDn(subjectDn(cert)) === want;
    }
    const matcher = SAN_MATCHERS[property];
    if (!matcher) return false;
    const [type, same] = matcher;
    return (subjectAltNames(cert).get(type) ?? []).some((value) => same(value, expected));
  },
};

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
// client_secret form field means client_secret_post, an Authorization header Basic. With none
// of these (client_id in the form only) oidc-provider allows only the certificate methods and
// has already checked the certificate, so for a tls_client_auth / self_signed_tls_client_auth
// client that is its registered method.
function usedAuthMethod(ctx) {
  const body = ctx.oidc.body;
  if (body?.client_assertion !== undefined) {
    const alg = describeAssertion(body.client_assertion).assertion_header?.alg;
    return typeof alg === 'string' && alg.startsWith('HS') ? 'client_secret_jwt' : 'private_key_jwt';
  }
  if (body?.client_secret !== undefined) return 'client_secret_post';
  if (ctx.get('authorization')) return 'client_secret_basic';
  const registered = ctx.oidc.client?.clientAuthMethod;
  return TLS_METHODS.has(registered) ? registered : 'none';
}

// oidc-provider accepts client_secret_basic and client_secret_post interchangeably for any
// secret-based client. Real IdPs (Auth0, Okta, Entra) enforce the registered method, and the
// proxy's auth_method setting is only testable if this one does too. oidc-provider already
// enforces the JWT and certificate methods itself (method family and assertion alg); this
// check repeats that for every registered method. Runs during the grant, i.e. after
// oidc-provider authenticated the client (see resourceServerInfo).
function enforceRegisteredAuthMethod(ctx) {
  const registered = ctx.oidc.client?.clientAuthMethod;
  if (!AUTH_METHODS.has(registered)) return;
  const used = usedAuthMethod(ctx);
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
  ...Object.fromEntries(TLS_SUBJECT_FIELDS.filter((f) => c[f] !== undefined).map((f) => [f, c[f]])),
  ...(c.tls_client_certificate_bound_access_tokens !== undefined && {
    tls_client_certificate_bound_access_tokens: c.tls_client_certificate_bound_access_tokens,
  }),
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
}));

// The IDP_CLIENTS are served by the adapter (model 'Client'), not as oidc-provider static
// clients (`clients:`): a static client is built once and cached for the provider's lifetime,
// an adapter-served one is rebuilt whenever its stored metadata changes (Client.find caches
// by a hash of the metadata). That is what lets POST /__test/clients/<id>/secret rotate a
// secret at runtime: replace the stored metadata, and the next request sees the new secret.
const clientStore = new MemoryAdapter('Client');

const TOKEN_PATH = '/token'; // fixed (routes option) so the mTLS alias can be built up front

async function buildProvider(issuer, mtlsOrigin) {
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
    clients: [], // served by the adapter instead, see clientStore
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ALL_SCOPES,
    clientBasedCORS: () => false,
    clientAuthMethods: [...AUTH_METHODS].filter((m) => TLS || !TLS_METHODS.has(m)),
    enabledJWA: { clientAuthSigningAlgValues: CLIENT_AUTH_ALGS },
    routes: { token: TOKEN_PATH },
    // Merged into the discovery document (RFC 8705 section 5): certificate-bound requests go
    // to the mTLS listener's token endpoint. tls_client_certificate_bound_access_tokens is
    // advertised by oidc-provider itself.
    ...(mtlsOrigin && {
      discovery: { mtls_endpoint_aliases: { token_endpoint: `${mtlsOrigin}${TOKEN_PATH}` } },
    }),
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      ...(TLS && { mTLS: MTLS_FEATURE }),
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
    const cert = peerCertificate(ctx);
    const record = {
      time: new Date().toISOString(),
      method: ctx.method,
      content_type: ctx.get('content-type') || null,
      ...describeAuthorization(ctx.get('authorization')),
      client_cert_subject: cert ? subjectDn(cert) : null,
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

  // oidc-provider validates adapter-served clients lazily (first token request); validate
  // them now so a bad IDP_CLIENTS entry (e.g. a private key in jwks) fails the start with a
  // clear message, then put them where Client.find looks for them.
  for (const metadata of CLIENT_METADATA) {
    try {
      await provider.Client.validate(metadata);
    } catch (err) {
      fail(`client ${metadata.client_id}: ${err.error_description ?? err.message}`);
    }
    await clientStore.upsert(metadata.client_id, metadata);
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

// POST /__test/clients/<client_id>/secret {"client_secret": "new"}: from now on only the new
// secret authenticates the client (client_secret_basic / _post / _jwt).
const ROTATE_PATH = /^\/__test\/clients\/([^/]+)\/secret$/;
const MAX_TEST_BODY = 64 * 1024;

// The whole request body, or null if it is larger than `limit` (read to the end either way).
function readBody(req, limit) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= limit) chunks.push(chunk);
    });
    req.on('end', () => resolve(size <= limit ? Buffer.concat(chunks) : null));
    req.on('error', reject);
  });
}

async function rotateSecret(req, res, rawClientId) {
  const raw = await readBody(req, MAX_TEST_BODY);
  let clientId;
  try {
    clientId = decodeURIComponent(rawClientId);
  } catch {
    clientId = undefined;
  }
  const current = clientId === undefined ? undefined : await clientStore.find(clientId);
  if (!current) {
    return sendJson(res, 404, { error: 'not_found', error_description: 'unknown client' });
  }
  let body = null;
  try {
    body = raw === null ? null : JSON.parse(raw.toString('utf8'));
  } catch {
    body = null;
  }
  if (body === null || typeof body !== 'object' || Array.isArray(body)
      || typeof body.client_secret !== 'string' || body.client_secret === '') {
    return sendJson(res, 400, {
      error: 'invalid_request',
      error_description: 'body must be JSON {"client_secret": "<non-empty string>"}',
    });
  }
  const metadata = { ...current, client_secret: body.client_secret };
  try {
    await provider.Client.validate(metadata);
  } catch (err) {
    return sendJson(res, 400, {
      error: 'invalid_request',
      error_description: err.error_description ?? err.message,
    });
  }
  await clientStore.upsert(clientId, metadata);
  return sendJson(res, 200, { rotated: true });
}

async function testEndpoint(req, res) {
  const path = req.url.split('?', 1)[0];
  const rotate = req.method === 'POST' ? ROTATE_PATH.exec(path) : null;
  if (rotate) return rotateSecret(req, res, rotate[1]);
  req.resume(); // the other test endpoints ignore request bodies
  if (req.method === 'GET' && path === '/__test/token-requests') {
    return sendJson(res, 200, tokenRequests);
  }
  if (req.method === 'POST' && path === '/__test/reset') {
    tokenRequests.length = 0;
    return sendJson(res, 200, { reset: true });
  }
  return sendJson(res, 404, { error: 'not_found' });
}

// GET a JSON document from one of our own listeners. Over https this one loopback call does
// not verify the server certificate: it is the one we were given, and its CA is not ours.
function getOwnJson(url) {
  return new Promise((resolve, reject) => {
    const get = url.startsWith('https:') ? https.get : http.get;
    get(url, { agent: false, rejectUnauthorized: false }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => {
        data += chunk;
      });
      res.on('end', () => {
        try {
          resolve(JSON.parse(data));
        } catch (err) {
          reject(err);
        }
      });
    }).on('error', reject);
  });
}

// Plain http, or with IDP_TLS_CERT_FILE / IDP_TLS_KEY_FILE https without client certificates
// plus the mTLS listener, which asks for one but lets the handshake succeed without it or with
// an unverified one: tls_client_auth checks socket.authorized, self_signed_tls_client_auth
// the registered certificate (see MTLS_FEATURE).
function createServer(options) {
  try {
    return options ? https.createServer(options) : http.createServer();
  } catch (err) {
    return fail(`cannot use IDP_TLS_CERT_FILE / IDP_TLS_KEY_FILE / IDP_TLS_CLIENT_CA_FILE: ${err.message}`);
  }
}

async function listen(server, port, what) {
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 66_000;
  server.on('error', (err) => fail(`cannot listen on ${HOST}:${port} (${what}): ${err.message}`));
  await new Promise((resolve) => server.listen(port, HOST, resolve));
  const host = HOST.includes(':') ? `[${HOST}]` : HOST;
  return `${TLS ? 'https' : 'http'}://${host}:${server.address().port}`;
}

const server = createServer(TLS && { cert: TLS_CERT, key: TLS_KEY });
const mtlsServer = TLS ? createServer({
  cert: TLS_CERT,
  key: TLS_KEY,
  ...(TLS_CLIENT_CA !== undefined && { ca: TLS_CLIENT_CA }),
  requestCert: true,
  rejectUnauthorized: false,
}) : null;
mtlsServer?.on('secureConnection', (socket) => mtlsSockets.add(socket));

// The issuer needs the real port, so the provider is built only after listen() (IDP_PORT=0).
const issuer = await listen(server, PORT, 'IDP_PORT');
const mtlsOrigin = mtlsServer ? await listen(mtlsServer, MTLS_PORT, 'IDP_MTLS_PORT') : undefined;
const provider = await buildProvider(issuer, mtlsOrigin);
const providerCallback = provider.callback();

function handleRequest(req, res) {
  if (req.url.startsWith('/__test/')) {
    return testEndpoint(req, res).catch((err) => {
      process.stderr.write(`idp: ${req.method} ${req.url}: ${err?.stack ?? err}\n`);
      if (!res.headersSent) sendJson(res, 500, { error: 'server_error' });
      else res.destroy();
    });
  }
  return providerCallback(req, res);
}
server.on('request', handleRequest);
mtlsServer?.on('request', handleRequest);

// Read the token endpoint from our own discovery document: proves discovery works before we
// announce readiness, and reports the real path rather than an assumed one.
const discovery = await getOwnJson(`${issuer}/.well-known/openid-configuration`);
process.stdout.write(`${JSON.stringify({
  event: 'idp_ready',
  issuer,
  token_url: discovery.token_endpoint,
  ...(mtlsServer && { mtls_token_url: discovery.mtls_endpoint_aliases?.token_endpoint }),
})}\n`);

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

function shutdown() {
  const servers = [server, mtlsServer].filter(Boolean);
  let open = servers.length;
  for (const s of servers) {
    s.close(() => {
      open -= 1;
      if (open === 0) process.exit(0);
    });
    s.closeAllConnections();
  }
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
