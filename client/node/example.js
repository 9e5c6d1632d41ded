// Creates a session with one 64x32 matrix and one bias, runs one step with
// random gradients, prints what came back, and deletes the session.
//   node example.js HOST:PORT
'use strict';

const { MuonClient } = require('./muon_client');

async function main() {
  const address = process.argv[2] || '127.0.0.1:50051';
  const client = new MuonClient(address);
  const session = await client.createSession([
    { name: 'w', shape: [64, 32] },
    { name: 'b', shape: [32] },
  ]);
  const grads = new Map([
    [0, Float32Array.from({ length: 64 * 32 }, () => Math.random() - 0.5)],
    [1, Float32Array.from({ length: 32 }, () => Math.random() - 0.5)],
  ]);
  const { summary, updates } = await client.step(session, 1, grads);
  for (const [index, { update, decay }] of updates) {
    const rms = Math.sqrt(update.reduce((s, v) => s + v * v, 0) / update.length);
    console.log(`param ${index}: ${update.length} values, update rms ${rms.toExponential(3)}, decay ${decay}`);
  }
  console.log(`step ${summary.step} committed, ${summary.param_indices.length} parameters`);
  await client.deleteSession(session);
  client.close();
}

main().catch((err) => {
  console.error(`muon-server: ${err.message}`);
  process.exit(1);
});
