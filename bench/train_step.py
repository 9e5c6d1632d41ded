#!/usr/bin/python3
"""One training step of a GPT-2-shaped model on the CPU with a local Muon,
with RemoteMuon sending after backward, and with RemoteMuon streaming
gradients during backward (docs/performance.md, "Training step").

    PYTHONPATH=build/python:client/python bench/train_step.py --preset=gpt2-small --steps=3

Starts its own muon-server (--server_bin, CPU engine) unless --server is
given. Per optimizer it prints, per timed step and as medians: forward,
backward, the whole step, and the optimizer's visible cost = step − forward
− backward (for RemoteMuon: what step() waits for once backward is done;
with --clip the clipping is counted in it).

Presets (pre-LN transformer blocks, tied embedding, AdamW for embeddings,
norms and biases, Muon for the block matrices):
  gpt2-small: d=768, 12 layers, 12 heads, vocab 50257, 1×256 tokens.
  scaled: d=512, 4 layers, 8 heads, vocab 8192, 8×256 tokens: backward
          takes seconds while the Muon step stays small, so what streaming
          can hide (the transfer, and compute that fits beside backward)
          shows on a 2-core machine.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

A, B, C = 3.4445, -4.7750, 2.0315
PRESETS = {
    "gpt2-small": dict(d=768, layers=12, heads=12, vocab=50257, batch=1, seq=256),
    "scaled": dict(d=512, layers=4, heads=8, vocab=8192, batch=8, seq=256),
}


class Block(torch.nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.fc = torch.nn.Linear(d, 4 * d)
        self.out = torch.nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        mask = torch.full((t, t), float("-inf")).triu(1)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5 + mask, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(torch.nn.Module):
    def __init__(self, d, layers, heads, vocab, seq, **_):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.wpe = torch.nn.Embedding(seq, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(d)
        for e in (self.wte, self.wpe):
            torch.nn.init.normal_(e.weight, std=0.02)  # GPT-2's

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln(x) @ self.wte.weight.T  # tied head
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def groups_of(model):
    muon = [p for n, p in model.named_parameters() if p.ndim == 2 and "wte" not in n
            and "wpe" not in n]
    ids = {id(p) for p in muon}
    return muon, [p for p in model.parameters() if id(p) not in ids]


class LocalMuon:
    """Muon (Nesterov EMA momentum, 5 jordan Newton–Schulz steps on the wide
    orientation, lr·sqrt(max(1, rows/cols))) and AdamW, in torch on the CPU:
    the tests' reference, one matrix at a time."""

    def __init__(self, muon, adamw, lr=0.02, beta=0.95, adamw_lr=3e-4):
        self.muon, self.adamw = muon, adamw
        self.lr, self.beta, self.adamw_lr = lr, beta, adamw_lr
        self.buf = [torch.zeros_like(p) for p in muon]
        self.m = [torch.zeros_like(p) for p in adamw]
        self.v = [torch.zeros_like(p) for p in adamw]
        self.t = 0

    @torch.no_grad()
    def step(self):
        for p, buf in zip(self.muon, self.buf):
            buf.lerp_(p.grad, 1 - self.beta)
            g = p.grad.lerp(buf, self.beta)
            x = g.T if g.shape[0] > g.shape[1] else g
            x = x / (x.norm() + 1e-7)
            for _ in range(5):
                a = x @ x.T
                x = A * x + (B * a + C * a @ a) @ x
            x = x.T if g.shape[0] > g.shape[1] else x
            p.add_(x, alpha=-self.lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
        self.t += 1
        for p, m, v in zip(self.adamw, self.m, self.v):
            m.lerp_(p.grad, 0.1)
            v.mul_(0.95).addcmul_(p.grad, p.grad, value=0.05)
            denom = (v / (1 - 0.95 ** self.t)).sqrt_().add_(1e-10)
            p.addcdiv_(m, denom, value=-self.adamw_lr / (1 - 0.9 ** self.t))

    def zero_grad(self):
        for p in self.muon + self.adamw:
            p.grad = None


def run(name, make_opt, cfg, steps, warmup, seed, clip):
    torch.manual_seed(seed)
    model = GPT(**cfg)
    opt = make_opt(model)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(warmup + steps):
        idx = torch.randint(cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
        t0 = time.perf_counter()
        loss = model(idx, idx.roll(-1, dims=1))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if clip:
            # RemoteMuon's keeps the streams (the server scales); torch's in place.
            if hasattr(opt, "clip_grad_norm_"):
                opt.clip_grad_norm_(clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        t3 = time.perf_counter()
        opt.zero_grad()
        if i >= warmup:
            rows.append((t1 - t0, t2 - t1, t3 - t0, t3 - t2))
            print(f"{name:>18} step {i - warmup + 1}: forward {t1 - t0:6.2f} s  backward "
                  f"{t2 - t1:6.2f} s  step {t3 - t0:6.2f} s  visible optimizer {t3 - t2:6.2f} s"
                  f"  loss {loss.item():.4f}", flush=True)
    if hasattr(opt, "close"):
        opt.close()
    return [statistics.median(c) for c in zip(*rows)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="scaled")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the trainer")
    parser.add_argument("--server", default="", help="a running muon-server; default: start one")
    parser.add_argument("--server_bin", default="build/bin/muon-server")
    parser.add_argument("--server_flags", default="", help="extra flags for the started server")
    parser.add_argument("--clip", type=float, default=0.0,
                        help="clip the global gradient norm to this (0: no clipping); timed "
                             "with the optimizer")
    parser.add_argument("--only", default="local,off,on",
                        help="which of local, off (RemoteMuon, streaming off), on (streaming), "
                             "transfer (streaming, compute deferred to StepEnd)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    server = None
    address = args.server
    if not address:
        tmp = tempfile.TemporaryDirectory()
        port_file = os.path.join(tmp.name, "port")
        server = subprocess.Popen([args.server_bin, "--listen=127.0.0.1:0",
                                   f"--port_file={port_file}", "--metrics_listen=",
                                   "--engine=cpu", *args.server_flags.split()],
                                  stdout=subprocess.DEVNULL)
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if server.poll() is not None:
                sys.exit("muon-server did not start")
            time.sleep(0.05)
        address = f"127.0.0.1:{open(port_file).read().strip()}"
    from muon_client import RemoteMuon

    def remote(streaming):
        def make(model):
            muon, adamw = groups_of(model)
            return RemoteMuon([{"params": muon, "kind": "muon"},
                               {"params": adamw, "kind": "adamw"}], server=address, lr=0.02,
                              weight_decay=0.0, adamw_lr=3e-4, stream_gradients=streaming)
        return make

    makers = {"local": lambda m: LocalMuon(*groups_of(m)), "off": remote(False),
              "on": remote(True), "transfer": remote("transfer")}
    names = {"local": "local Muon", "off": "RemoteMuon", "on": "RemoteMuon stream",
             "transfer": "stream, transfer only"}
    n = sum(p.numel() for p in GPT(**cfg).parameters())
    print(f"preset {args.preset}: {n / 1e6:.1f}M parameters, {cfg}; torch threads "
          f"{args.threads}; clip {args.clip or 'off'}; server {address}; "
          f"load {os.getloadavg()}", flush=True)
    results = {}
    try:
        for key in args.only.split(","):
            results[key] = run(names[key], makers[key], cfg, args.steps, args.warmup, seed=0,
                               clip=args.clip)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    print("median           forward  backward      step   visible optimizer")
    for key, (fwd, bwd, step, visible) in results.items():
        print(f"{names[key]:>18} {fwd:8.2f} {bwd:9.2f} {step:9.2f} {visible:11.2f} s")
    for key in ("on", "transfer"):
        if key in results and "off" in results:
            print(f"visible cost {names[key]} / not streaming: "
                  f"{results[key][3] / results['off'][3]:.2f}; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
