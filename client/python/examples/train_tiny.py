#!/usr/bin/env python3
"""Trains a small MLP with RemoteMuon on data it generates itself.

    train_tiny.py --server=127.0.0.1:50051 --steps=200 [--check]

With --check it also trains the same model from the same seed with a local
pure-PyTorch Muon written from docs/math.md's formulas, prints both final losses
on its last line, and exits non-zero if the two loss curves differ anywhere
by more than 1% of the first loss or the loss did not halve.
"""
import argparse
import sys

import torch

from muon_client import RemoteMuon

# The two loss curves may differ at any step by at most this fraction of the
# first loss. Server and local runs differ only by rounding (fp32 BLAS on the
# CPU engine, bf16 products on the GPU), which compounds over steps; a wrong
# update (sign, scale, momentum, schedule) moves the curve by far more.
TOLERANCE = 0.01


def make_data(seed, n=1024, dim=16, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    teacher = torch.randn(dim, classes, generator=g)
    y = (torch.tanh(x @ teacher) + 0.1 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return x, y


def make_model(seed, dim=16, hidden=64, classes=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, classes))


def newton_schulz(m, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


class LocalMuon(torch.optim.Optimizer):
    """Muon for matrices, AdamW for the rest, as docs/math.md writes them."""

    def __init__(self, params, lr, adamw_lr, momentum=0.95, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0):
        super().__init__(params, dict(lr=lr, adamw_lr=adamw_lr, momentum=momentum, betas=betas,
                                      eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state, wd = p.grad, self.state[p], group["weight_decay"]
                if p.ndim >= 2:
                    beta, lr = group["momentum"], group["lr"]
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(beta).add_(g, alpha=1 - beta)
                    m = (1 - beta) * g + beta * buf
                    scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                    p.mul_(1 - lr * wd).add_(newton_schulz(m), alpha=-lr * scale)
                else:
                    (b1, b2), lr = group["betas"], group["adamw_lr"]
                    state["step"] = state.get("step", 0) + 1
                    m = state.setdefault("m", torch.zeros_like(p))
                    v = state.setdefault("v", torch.zeros_like(p))
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    mhat = m / (1 - b1 ** state["step"])
                    vhat = v / (1 - b2 ** state["step"])
                    p.mul_(1 - lr * wd).add_(-lr * mhat / (vhat.sqrt() + group["eps"]))


def train(model, optimizer, x, y, steps, log_every, label):
    """Returns the loss before each step, then the final loss."""
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == 1):
            print(f"{label} step {step:4d} loss {losses[-1]:.6f}", flush=True)
    with torch.no_grad():
        losses.append(loss_fn(model(x), y).item())
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True,
                        help="HOST:PORT of muon-server; several, comma-separated, to shard")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--adamw_lr", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--check", action="store_true",
                        help="also train with a local PyTorch Muon and compare")
    args = parser.parse_args()
    log_every = max(1, args.steps // 10)
    x, y = make_data(args.seed)

    model = make_model(args.seed)
    remote = RemoteMuon(model.named_parameters(), server=args.server.split(","), lr=args.lr,
                        weight_decay=args.weight_decay, adamw_lr=args.adamw_lr,
                        adamw_betas=(0.9, 0.999), adamw_eps=1e-8,
                        adamw_weight_decay=args.weight_decay)
    remote_losses = train(model, remote, x, y, args.steps, log_every, "remote")
    remote.delete_sessions()
    first, remote_loss = remote_losses[0], remote_losses[-1]
    if not args.check:
        print(f"final loss {remote_loss:.6f}")
        return 0 if remote_loss < first else 1

    model = make_model(args.seed)
    local = LocalMuon(model.parameters(), lr=args.lr, adamw_lr=args.adamw_lr,
                      weight_decay=args.weight_decay)
    local_losses = train(model, local, x, y, args.steps, log_every, "local")
    local_loss = local_losses[-1]
    diff = max(abs(r - l) for r, l in zip(remote_losses, local_losses))
    ok = diff <= TOLERANCE * first and remote_loss < 0.5 * first
    print(f"final loss remote {remote_loss:.6f} local {local_loss:.6f} "
          f"(first {first:.6f}, largest |diff| over the run {diff:.2e}, "
          f"tolerance {TOLERANCE * first:.2e}) {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
