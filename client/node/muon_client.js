// A small muon-server client for Node.js: the stubs come straight from
// proto/ through @grpc/proto-loader, as any language's would.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.MUON_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
const CHUNK_BYTES = 1 << 20;

function loadService() {
  const definition = protoLoader.loadSync('muon/v1/optimizer.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).muon.v1.Optimizer;
}

// Adds update chunk `u` to `buffers` (Map: parameter index -> {bytes,
// decay}), making its tensor's buffer at its first chunk: its own
// ArrayBuffer (offset 0, so 4-aligned), so the update is a Float32Array over
// it with no copy at the end. Returns an Error, changing nothing, for a
// chunk that runs past its tensor.
function addUpdateChunk(buffers, u) {
  const entry = buffers.get(u.param_index);
  const size = entry ? entry.bytes.length : u.total_bytes;
  if (u.offset + u.data.length > size) {
    return new Error(`update chunk of parameter ${u.param_index} runs past its ${size} bytes`);
  }
  if (entry) {
    entry.bytes.set(u.data, u.offset); // the chunk's one copy
  } else {
    const bytes = new Uint8Array(new ArrayBuffer(u.total_bytes));
    bytes.set(u.data, u.offset);
    buffers.set(u.param_index, { bytes, decay: u.decay });
  }
  return null;
}

class MuonClient {
  // tls (optional), PEM Buffers: {rootCerts} for TLS (null: Node's default
  // roots), plus {certChain, privateKey} for mutual TLS; {serverName}
  // overrides the name checked in the server's certificate.
  constructor(address, tls = null) {
    const Optimizer = loadService();
    if (!tls) {
      this.stub = new Optimizer(address, grpc.credentials.createInsecure());
      return;
    }
    const credentials = grpc.credentials.createSsl(
      tls.rootCerts || null, tls.privateKey || null, tls.certChain || null);
    const options = tls.serverName ? { 'grpc.ssl_target_name_override': tls.serverName } : {};
    this.stub = new Optimizer(address, credentials, options);
  }

  close() {
    this.stub.close();
  }

  // params: [{name, shape: [..], kind?: 'OPTIMIZER_KIND_MUON' | 'OPTIMIZER_KIND_ADAMW'}], fp32.
  createSession(params, hyperParams = {}) {
    return new Promise((resolve, reject) => {
      this.stub.CreateSession(
        {
          params: params.map((p) => ({ name: p.name, shape: p.shape, dtype: 'DTYPE_FLOAT32', kind: p.kind })),
          hyper_params: hyperParams,
        },
        (err, response) => (err ? reject(err) : resolve(response)),
      );
    });
  }

  // grads: Map of parameter index -> Float32Array. Resolves, after the
  // server's summary (the commit), to {summary, updates: Map(index ->
  // {update: Float32Array, decay})}: apply W <- decay*W + update.
  step(session, stepNumber, grads) {
    return new Promise((resolve, reject) => {
      const buffers = new Map();
      let summary = null;
      const call = this.stub.Step();
      call.on('data', (response) => {
        if (response.update) {
          const error = addUpdateChunk(buffers, response.update);
          if (error) {
            call.cancel();
            reject(error);
          }
        } else if (response.summary) {
          summary = response.summary;
        }
      });
      call.on('error', reject);
      call.on('end', () => {
        if (!summary) {
          reject(new Error('step stream ended without a summary'));
          return;
        }
        const updates = new Map();
        for (const [index, entry] of buffers) {
          updates.set(index, { update: new Float32Array(entry.bytes.buffer), decay: entry.decay });
        }
        resolve({ summary, updates });
      });
      call.write({ header: { session_id: session.session_id, token: session.token, step: stepNumber } });
      for (const [index, grad] of grads) {
        const bytes = Buffer.from(grad.buffer, grad.byteOffset, grad.byteLength);
        for (let offset = 0; offset < bytes.length; offset += CHUNK_BYTES) {
          call.write({
            gradient: { param_index: index, offset, data: bytes.subarray(offset, offset + CHUNK_BYTES) },
          });
        }
      }
      call.write({ end: { param_indices: [...grads.keys()] } });
      call.end();
    });
  }

  deleteSession(session) {
    return new Promise((resolve, reject) => {
      this.stub.DeleteSession({ session_id: session.session_id, token: session.token }, (err) =>
        err ? reject(err) : resolve(),
      );
    });
  }
}

module.exports = { MuonClient, addUpdateChunk };
