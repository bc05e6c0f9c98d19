// Unmodified google-auth-library and gcp-metadata, pointed at wlidd only through GCE_METADATA_HOST /
// GCE_METADATA_IP (and never METADATA_SERVER_DETECTION): run by tests/test_clients_node.py.
//
//   node client.js detect                  {"available": bool}          gcpMetadata.isAvailable()
//   node client.js adc                     {"client", "token_sha256", "expires_in_s", "project"}
//                                          new GoogleAuth(): getClient(), getAccessToken(), getProjectId()
//   node client.js id-token AUDIENCE       {"claims": {aud, exp, iss, email}}  getIdTokenClient(aud) headers
//   node client.js scoped SCOPE...         {"client", "token_sha256"}   new GoogleAuth({scopes}).getAccessToken()
//   node client.js compute-scoped SCOPE... {"token_sha256"}             new Compute({scopes}) (no detection)
//   node client.js metadata                {"project", "numeric_project", "email", "universe"}  gcp-metadata
//
// One JSON line on stdout; on failure {"error": "..."} and exit status 1. Tokens are never printed:
// an access token as its SHA-256, an ID token as its decoded claims (the test output is checked for
// secrets, tests/conftest.py).
'use strict';

const crypto = require('node:crypto');
const gcpMetadata = require('gcp-metadata');
const {GoogleAuth, Compute} = require('google-auth-library');

const sha256 = text => crypto.createHash('sha256').update(text).digest('hex');

function claimsOf(jwt) {
  const payload = JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());
  return {aud: payload.aud, exp: payload.exp, iss: payload.iss, email: payload.email};
}

function secondsLeft(client) {
  const expiry = client.credentials && client.credentials.expiry_date;
  return typeof expiry === 'number' ? Math.round((expiry - Date.now()) / 1000) : null;
}

const commands = {
  async detect() {
    return {available: await gcpMetadata.isAvailable()};
  },
  async adc() {
    const auth = new GoogleAuth();
    const client = await auth.getClient();
    const token = await auth.getAccessToken();
    const project = await auth.getProjectId();
    return {
      client: client.constructor.name,
      token_sha256: sha256(token),
      expires_in_s: secondsLeft(client),
      project,
    };
  },
  async 'id-token'(audience) {
    const auth = new GoogleAuth();
    const client = await auth.getIdTokenClient(audience);
    const headers = await client.getRequestHeaders();
    const value = typeof headers.get === 'function' ? headers.get('authorization') : headers.Authorization;
    if (!value || !value.startsWith('Bearer ')) throw new Error('no Bearer ID token in the request headers');
    return {claims: claimsOf(value.slice('Bearer '.length))};
  },
  async scoped(...scopes) {
    const auth = new GoogleAuth({scopes: scopes.length === 1 ? scopes[0] : scopes});  // a string, as storage passes one
    const client = await auth.getClient();
    return {client: client.constructor.name, token_sha256: sha256(await auth.getAccessToken())};
  },
  async 'compute-scoped'(...scopes) {
    const client = new Compute({scopes});
    const {token} = await client.getAccessToken();
    return {token_sha256: sha256(token)};
  },
  async metadata() {
    return {
      project: await gcpMetadata.project('project-id'),
      numeric_project: String(await gcpMetadata.project('numeric-project-id')),
      email: await gcpMetadata.instance('service-accounts/default/email'),
      universe: await gcpMetadata.universe('universe-domain'),
    };
  },
};

async function main() {
  const [name, ...args] = process.argv.slice(2);
  const command = commands[name];
  if (!command) throw new Error(`unknown command ${name}; one of ${Object.keys(commands).join(', ')}`);
  process.stdout.write(JSON.stringify(await command(...args)) + '\n');
}

main().catch(err => {
  const status = err && err.response ? ` (HTTP ${err.response.status})` : '';
  process.stdout.write(JSON.stringify({error: `${err && err.message ? err.message : err}${status}`.slice(0, 1500)}) + '\n');
  process.exitCode = 1;
});
