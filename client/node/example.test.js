// Runs example.js against a real muon-server (MUON_SERVER_BIN) on a free port.
'use strict';

const test = require('node:test');
const assert = require('node:assert');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn, execFileSync } = require('child_process');

function startServer(extraFlags = []) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'muon-node-'));
  const portFile = path.join(dir, 'port');
  const server = spawn(process.env.MUON_SERVER_BIN, [
    '--listen=127.0.0.1:0', `--port_file=${portFile}`, '--metrics_listen=', '--engine=cpu',
    ...extraFlags,
  ], { stdio: 'ignore' });
  const deadline = Date.now() + 60000;
  return new Promise((resolve, reject) => {
    const poll = () => {
      const port = fs.existsSync(portFile) ? fs.readFileSync(portFile, 'utf8').trim() : '';
      if (port) return resolve({ server, address: `127.0.0.1:${port}` });
      if (Date.now() > deadline || server.exitCode !== null) return reject(new Error('server did not start'));
      setTimeout(poll, 50);
    };
    poll();
  });
}

test('example.js creates a session and runs one step', async () => {
  const { server, address } = await startServer();
  try {
    const out = execFileSync(process.execPath, [path.join(__dirname, 'example.js'), address], {
      encoding: 'utf8', timeout: 60000,
    });
    assert.match(out, /param 0: 2048 values, update rms [0-9.]+e-\d+, decay 1/);
    assert.match(out, /param 1: 32 values/);
    assert.match(out, /step 1 committed, 2 parameters/);
  } finally {
    server.kill('SIGTERM');
  }
});

test('MuonClient speaks TLS to a TLS server, and plaintext is refused', async () => {
  const { MuonClient } = require('./muon_client');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'muon-node-tls-'));
  const cert = path.join(dir, 'server.pem');
  const key = path.join(dir, 'server.key');
  // Self-signed for 127.0.0.1: the certificate is its own CA.
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-days', '2', '-subj', '/CN=localhost', '-addext',
    'subjectAltName=IP:127.0.0.1,DNS:localhost', '-keyout', key, '-out', cert], { stdio: 'ignore' });
  const { server, address } = await startServer([`--tls_cert=${cert}`, `--tls_key=${key}`]);
  const tls = new MuonClient(address, { rootCerts: fs.readFileSync(cert) });
  const plain = new MuonClient(address);
  try {
    const session = await tls.createSession([{ name: 'w', shape: [4, 4] }]);
    const { summary } = await tls.step(session, 1, new Map([[0, new Float32Array(16).fill(1)]]));
    assert.strictEqual(summary.step, 1);
    await tls.deleteSession(session);
    await assert.rejects(plain.createSession([{ name: 'w', shape: [4, 4] }]),
      (err) => err.code === 14); // UNAVAILABLE
  } finally {
    tls.close();
    plain.close();
    server.kill('SIGTERM');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an update of several chunks arrives whole, every element in place', async () => {
  const { MuonClient } = require('./muon_client');
  const { server, address } = await startServer();
  const client = new MuonClient(address);
  try {
    // 1.5 MiB: two update chunks. AdamW's first step is -lr * g / (|g| + eps),
    // -lr * sign(g) to 1e-7 here, so every element shows where it landed.
    const n = 393216;
    const session = await client.createSession([{ name: 'b', shape: [n], kind: 'OPTIMIZER_KIND_ADAMW' }]);
    const grad = new Float32Array(n);
    for (let i = 0; i < n; i++) grad[i] = (Math.random() + 0.5) * (Math.random() < 0.5 ? -1 : 1);
    const { updates } = await client.step(session, 1, new Map([[0, grad]]));
    const update = updates.get(0).update;
    assert.strictEqual(update.length, n);
    const lr = Math.abs(update[0]);
    assert.ok(lr > 0);
    for (let i = 0; i < n; i++) {
      if (Math.sign(update[i]) !== -Math.sign(grad[i]) || Math.abs(Math.abs(update[i]) - lr) > 1e-5 * lr) {
        assert.fail(`element ${i}: update ${update[i]} for gradient ${grad[i]} (lr ${lr})`);
      }
    }
    await client.deleteSession(session);
  } finally {
    client.close();
    server.kill('SIGTERM');
  }
});

test('an update chunk past its tensor is refused and changes nothing', () => {
  const { addUpdateChunk } = require('./muon_client');
  const buffers = new Map();
  const first = { param_index: 3, offset: 0, total_bytes: 8, decay: 1, data: Buffer.from([1, 2, 3, 4]) };
  assert.strictEqual(addUpdateChunk(buffers, first), null);
  const past = { param_index: 3, offset: 6, total_bytes: 8, decay: 1, data: Buffer.from([9, 9, 9, 9]) };
  assert.match(addUpdateChunk(buffers, past).message, /parameter 3 runs past its 8 bytes/);
  assert.deepStrictEqual([...buffers.get(3).bytes], [1, 2, 3, 4, 0, 0, 0, 0]);
  const alone = { param_index: 5, offset: 4, total_bytes: 6, decay: 1, data: Buffer.from([7, 7, 7]) };
  assert.match(addUpdateChunk(buffers, alone).message, /parameter 5 runs past its 6 bytes/);
  assert.strictEqual(buffers.has(5), false);
});
