// The dev stack's demo API (deploy/dev-idp/demo-api.js), served over TLS: the upstream of
// the HTTPS-interception benchmark (bench/https.py). m2m-proxy sends requests decrypted from
// an intercepted tunnel upstream over https only, so the upstream must speak TLS.
//
// demo-api.js calls http.createServer(handler); here that becomes https.createServer with
// the certificate and key in BENCH_TLS_CERT_FILE / BENCH_TLS_KEY_FILE (PEM), before the
// module is loaded. Everything else (environment, JWT checks, /__test endpoints, the
// `demo_api_ready` line, whose url still says http://) is the demo API's own.
//
// DEV / BENCHMARK ONLY.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { syncBuiltinESMExports } from 'node:module';

const certFile = process.env.BENCH_TLS_CERT_FILE;
const keyFile = process.env.BENCH_TLS_KEY_FILE;
if (!certFile || !keyFile) {
  process.stderr.write('tls_demo_api: BENCH_TLS_CERT_FILE and BENCH_TLS_KEY_FILE are required\n');
  process.exit(2);
}
const tls = { cert: readFileSync(certFile), key: readFileSync(keyFile), ALPNProtocols: ['http/1.1'] };

http.createServer = (options, handler) =>
  typeof options === 'function'
    ? https.createServer(tls, options)
    : https.createServer({ ...tls, ...options }, handler);
syncBuiltinESMExports(); // `import * as http` in demo-api.js now sees the patched function

await import(new URL('../deploy/dev-idp/demo-api.js', import.meta.url));
