// Validates Kubernetes manifests against the API's OpenAPI schemas, offline:
// the npm packages kubernetes-models (core and apps/policy/... groups) and
// @kubernetes-models/prometheus-operator (ServiceMonitor). Reads a JSON
// array of manifests on stdin (chart_test.py converts Helm's YAML), prints
// one line per manifest, exits 1 if any is invalid or of an unknown kind.
// The schemas check types, required fields and formats; like the API
// server's default (non-strict) field validation they let unknown fields
// through.
'use strict';

const fs = require('fs');

function modelFor(apiVersion, kind) {
  const pkg = apiVersion.startsWith('monitoring.coreos.com/')
    ? '@kubernetes-models/prometheus-operator'
    : 'kubernetes-models';
  // The core group ("v1") and named groups ("apps/v1") map to folders alike.
  const model = require(`${pkg}/${apiVersion}/${kind}`)[kind];
  if (typeof model !== 'function') throw new Error(`no model for ${apiVersion} ${kind}`);
  return model;
}

const manifests = JSON.parse(fs.readFileSync(0, 'utf8'));
let failed = 0;
for (const m of manifests) {
  const name = `${m.kind}/${m.metadata && m.metadata.name}`;
  try {
    new (modelFor(m.apiVersion, m.kind))(m).validate();
    console.log(`ok   ${m.apiVersion} ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${m.apiVersion} ${name}: ${e.message}`);
  }
}
console.log(`${manifests.length - failed} valid, ${failed} invalid`);
process.exit(failed === 0 && manifests.length > 0 ? 0 : 1);
