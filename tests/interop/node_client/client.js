#!/usr/bin/env node
// A ztnet controller client in a second language: Node.js with @grpc/grpc-js, the wire
// protocol loaded at run time from the repository's proto/ (the only definition of it).
//
//   node client.js --controller HOST:PORT --credentials DIR [--server-name NAME]
//
// Over mutual TLS with an admin credential directory (`ztnet controller admin-cert --out
// DIR`: admin.key, admin.pem, ca.pem) it calls grpc.health.v1.Health/Check, then
// AdminService ListHosts and GetPolicy, and prints one JSON object on stdout. Any failure:
// {"error": "<status name>", "code": N, "details": "..."} on stderr and exit status 1.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'proto');
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true };
const DEADLINE_MS = 10000;

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i];
    if (!flag.startsWith('--') || i + 1 >= argv.length) {
      throw new Error(`usage: client.js --controller HOST:PORT --credentials DIR`);
    }
    args[flag.slice(2)] = argv[i + 1];
  }
  if (!args.controller || !args.credentials) {
    throw new Error('--controller and --credentials are required');
  }
  return args;
}

function load(file, includeDirs) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(file, { ...LOADER_OPTIONS, includeDirs }));
}

// Promisify one unary call with a deadline.
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const dir = args.credentials;
  const credentials = grpc.credentials.createSsl(
    fs.readFileSync(path.join(dir, 'ca.pem')),
    fs.readFileSync(path.join(dir, 'admin.key')),
    fs.readFileSync(path.join(dir, 'admin.pem')),
  );
  const options = args['server-name'] ? { 'grpc.ssl_target_name_override': args['server-name'] } : {};

  const ztnet = load('ztnet/v1/admin.proto', [PROTO_ROOT]).ztnet.v1;
  const health = load('health.proto', [__dirname]).grpc.health.v1;
  const admin = new ztnet.AdminService(args.controller, credentials, options);
  const checker = new health.Health(args.controller, credentials, options);
  try {
    const status = await unary(checker, 'Check', { service: '' });
    const hosts = await unary(admin, 'ListHosts', {});
    const policy = await unary(admin, 'GetPolicy', {});
    process.stdout.write(JSON.stringify({
      health: status.status,
      hosts: hosts.hosts,
      policy: { version: policy.version, policy_toml: policy.policy_toml, applied_at: policy.applied_at },
    }) + '\n');
  } finally {
    admin.close();
    checker.close();
  }
}

main().catch((err) => {
  // a gRPC status (numeric code) by its name; anything else (a missing file …) as ERROR
  const isStatus = typeof err.code === 'number';
  const name = isStatus ? Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) : 'ERROR';
  process.stderr.write(JSON.stringify({
    error: name || 'UNKNOWN', code: isStatus ? err.code : null, details: err.details || err.message,
  }) + '\n');
  process.exit(1);
});
