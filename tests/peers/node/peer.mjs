// An independent Exchange Online stand-in for tests/deliver_node_peer.rs, built only from code
// nobody on this project wrote:
//   - oauth2-mock-server plays Entra ID: client-credentials tokens (RS256 JWTs) on
//     POST /<tenant>/oauth2/v2.0/token, its keys on GET /jwks;
//   - nodemailer's smtp-server plays smtp.office365.com:587: STARTTLS, then SASL XOAUTH2 only,
//     where the bearer token is verified with jose against the mock's JWKS (fetched over HTTP):
//     signature, iss, aud, exp/nbf, the SMTP.SendAsApp role and the XOAUTH2 user.
// Every accepted message is stored as <store>/<n>.eml (the bytes after DATA, dot-stuffing removed)
// plus <store>/<n>.json (envelope, XOAUTH2 user, TLS, token claims); the .json is written last.
// Token requests go to <store>/token-requests.jsonl, refused AUTHs to <store>/auth-failures.jsonl.
//
// Usage: node peer.mjs --store DIR --cert PEM --key PEM --tenant T --client-id ID
//                      --client-secret S --mail-account ADDR [--audience AUD]
// Prints one JSON line {"smtp_port":..,"token_port":..,"token_path":..,"issuer":..} on stdout when
// ready. Exits when stdin closes, on SIGTERM/SIGINT, or on any startup error (status 1).

import { appendFileSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { OAuth2Server, Events } from 'oauth2-mock-server';
import { SMTPServer } from 'smtp-server';
import { createRemoteJWKSet, jwtVerify } from 'jose';

const { values: opt } = parseArgs({
  options: {
    store: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    tenant: { type: 'string' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    'mail-account': { type: 'string' },
    // The audience the SMTP side accepts. Exchange Online wants https://outlook.office365.com;
    // the test passes another value to make the peer refuse the relay's (valid) token.
    audience: { type: 'string', default: 'https://outlook.office365.com' },
  },
});
for (const k of ['store', 'cert', 'key', 'tenant', 'client-id', 'client-secret', 'mail-account']) {
  if (!opt[k]) {
    console.error(`peer: --${k} is required`);
    process.exit(2);
  }
}

const log = (...a) => console.error('peer:', ...a);
const SEND_AS_APP = 'SMTP.SendAsApp';

// ---- Entra ID stand-in ------------------------------------------------------------------------
const tokenPath = `/${opt.tenant}/oauth2/v2.0/token`;
const oauth = new OAuth2Server(undefined, undefined, { endpoints: { token: tokenPath } });
await oauth.issuer.keys.generate('RS256');

// Shape the app-only token like Entra ID's for Exchange: the audience is the resource of the
// requested `.default` scope, and the app's permissions are in `roles`, not `scp`.
oauth.service.on(Events.BeforeTokenSigning, (token, req) => {
  const body = req.body ?? {};
  const scope = String(body.scope ?? '');
  token.payload.aud = scope.replace(/\/\.default$/, '');
  token.payload.appid = body.client_id;
  token.payload.tid = opt.tenant;
  token.payload.sub = `app:${body.client_id}`;
  token.payload.roles = [SEND_AS_APP];
  delete token.payload.scope;
});

// The mock accepts any client; check the client-credentials request ourselves, as Entra ID would.
oauth.service.on(Events.BeforeResponse, (response, req) => {
  const body = req.body ?? {};
  const record = {
    grant_type: body.grant_type,
    client_id: body.client_id,
    client_secret_ok: body.client_secret === opt['client-secret'],
    scope: body.scope,
    content_type: req.headers['content-type'],
  };
  appendFileSync(join(opt.store, 'token-requests.jsonl'), JSON.stringify(record) + '\n');
  let error;
  if (body.grant_type !== 'client_credentials') {
    error = ['unsupported_grant_type', 'AADSTS70003'];
  } else if (body.client_id !== opt['client-id'] || !record.client_secret_ok) {
    error = ['invalid_client', 'AADSTS7000215: Invalid client secret provided.'];
  } else if (body.scope !== 'https://outlook.office365.com/.default') {
    error = ['invalid_scope', 'AADSTS70011: The provided value for scope is not valid.'];
  }
  if (error) {
    response.statusCode = error[0] === 'invalid_client' ? 401 : 400;
    response.body = { error: error[0], error_description: error[1] };
  }
  log('token request', JSON.stringify(record), '->', response.statusCode);
});

await oauth.start(0, '127.0.0.1');
const tokenPort = oauth.address().port;
const issuer = oauth.issuer.url; // http://localhost:PORT
const jwks = createRemoteJWKSet(new URL(`http://127.0.0.1:${tokenPort}/jwks`));

// ---- Exchange Online stand-in -----------------------------------------------------------------
let stored = 0;

function authError() {
  const err = new Error('5.7.3 Authentication unsuccessful');
  err.responseCode = 535;
  return err;
}

const smtp = new SMTPServer({
  name: 'node-peer.test',
  banner: 'node smtp-server peer',
  secure: false,
  key: readFileSync(opt.key),
  cert: readFileSync(opt.cert),
  authMethods: ['XOAUTH2'],
  authOptional: false,
  allowInsecureAuth: false, // AUTH only after STARTTLS, like Exchange Online
  hideENHANCEDSTATUSCODES: true, // our replies carry Exchange's own enhanced codes in the text
  size: 35 * 1024 * 1024,
  logger: false,
  async onAuth(auth, session, callback) {
    const refuse = (reason) => {
      log('AUTH refused:', reason);
      appendFileSync(
        join(opt.store, 'auth-failures.jsonl'),
        JSON.stringify({ method: auth.method, user: auth.username, reason }) + '\n',
      );
      callback(authError());
    };
    if (auth.method !== 'XOAUTH2') return refuse(`method ${auth.method}`);
    if (!session.secure) return refuse('not over TLS');
    let payload;
    try {
      ({ payload } = await jwtVerify(auth.accessToken, jwks, {
        issuer,
        audience: opt.audience,
        algorithms: ['RS256'],
        requiredClaims: ['exp', 'iat'],
      }));
    } catch (e) {
      return refuse(`token: ${e.code ?? ''} ${e.message}`);
    }
    if (!Array.isArray(payload.roles) || !payload.roles.includes(SEND_AS_APP)) {
      return refuse(`token lacks the ${SEND_AS_APP} role`);
    }
    if (payload.appid !== opt['client-id']) return refuse(`token for app ${payload.appid}`);
    if (auth.username.toLowerCase() !== opt['mail-account'].toLowerCase()) {
      return refuse(`XOAUTH2 user ${auth.username} is not ${opt['mail-account']}`);
    }
    session.tokenClaims = payload;
    callback(null, { user: auth.username });
  },
  onData(stream, session, callback) {
    const chunks = [];
    stream.on('data', (c) => chunks.push(c));
    stream.on('error', callback);
    stream.on('end', () => {
      if (stream.sizeExceeded) return callback(); // smtp-server replies 552 itself
      const n = ++stored;
      const data = Buffer.concat(chunks);
      const meta = {
        mail_from: session.envelope.mailFrom ? session.envelope.mailFrom.address : null,
        mail_args: session.envelope.mailFrom ? session.envelope.mailFrom.args : null,
        rcpt_to: session.envelope.rcptTo.map((r) => r.address),
        auth_user: session.user,
        secure: session.secure,
        tls_protocol: session.tlsOptions ? session.tlsOptions.version ?? null : null,
        client_hostname: session.hostNameAppearsAs,
        transmission_type: session.transmissionType,
        token_aud: session.tokenClaims?.aud,
        token_appid: session.tokenClaims?.appid,
        token_roles: session.tokenClaims?.roles,
        size: data.length,
      };
      writeFileSync(join(opt.store, `${n}.eml`), data);
      const tmp = join(opt.store, `${n}.json.tmp`);
      writeFileSync(tmp, JSON.stringify(meta, null, 2));
      renameSync(tmp, join(opt.store, `${n}.json`));
      log(`stored message ${n} (${data.length} bytes) from ${meta.mail_from}`);
      callback(null, `2.6.0 <${n}@node-peer.test> Queued mail for delivery`);
    });
  },
});
smtp.on('error', (e) => log('smtp error:', e.message));

await new Promise((resolve, reject) => {
  smtp.server.once('error', reject);
  smtp.listen(0, '127.0.0.1', resolve);
});
const smtpPort = smtp.server.address().port;

// ---- lifetime ---------------------------------------------------------------------------------
let stopping = false;
function stop(why) {
  if (stopping) return;
  stopping = true;
  log('stopping:', why);
  // Do not wait for lingering connections: the test is over.
  setTimeout(() => process.exit(0), 500).unref();
  smtp.close(() => {});
  oauth.stop().finally(() => process.exit(0));
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
process.stdin.on('end', () => stop('stdin closed'));
process.stdin.on('close', () => stop('stdin closed'));
process.stdin.on('error', () => stop('stdin error'));
process.stdin.resume();

process.stdout.write(
  JSON.stringify({ smtp_port: smtpPort, token_port: tokenPort, token_path: tokenPath, issuer }) + '\n',
);
