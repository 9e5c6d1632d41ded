#!/usr/bin/python3
"""PyTorch's CPU Muon on GPT-2 small's 48 matrices, the baseline for the CPU
engine (docs/performance.md, "CPU engine against PyTorch").

One step is what a local Muon does: Nesterov EMA momentum (β = 0.95), 5
Newton–Schulz steps with the jordan coefficients on the wide orientation,
the update −lr·sqrt(max(1, m/n))·O and decoupled weight decay on the weights.
The matrices are batched by shape (torch.bmm over a stacked buffer per
shape), gradients and state already stacked: no copies into the batch are
timed, which favours PyTorch.

    bench/torch_muon_cpu.py --threads=2 --steps=3
prints one line per timed step and the median, in seconds.
"""
import argparse
import statistics
import time

import torch

D, LAYERS = 768, 12
SHAPES = [(D, 3 * D), (D, D), (4 * D, D), (D, 4 * D)]
A, B, C = 3.4445, -4.7750, 2.0315


def newton_schulz(g, steps):
    """g: (batch, rows, cols) fp32; the polar factor's NS estimate."""
    tall = g.size(-2) > g.size(-1)
    x = g.mT if tall else g
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        a = torch.bmm(x, x.mT)
        b = torch.baddbmm(a, a, a, beta=B, alpha=C)
        x = torch.baddbmm(x, b, x, beta=A)
    return x.mT if tall else x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lr, wd, beta = 0.02, 0.01, 0.95
    groups = []
    for rows, cols in SHAPES:
        groups.append({
            "weights": torch.randn(LAYERS, rows, cols),
            "momentum": torch.zeros(LAYERS, rows, cols),
            "grad": torch.randn(LAYERS, rows, cols),
            "scale": max(1.0, rows / cols) ** 0.5,
        })
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            for g in groups:
                g["momentum"].lerp_(g["grad"], 1 - beta)
                m = g["grad"].lerp(g["momentum"], beta)
                o = newton_schulz(m, 5)
                g["weights"].mul_(1 - lr * wd).add_(o, alpha=-lr * g["scale"])
            seconds = time.perf_counter() - start
            if i >= args.warmup:
                times.append(seconds)
                print(f"torch step {i - args.warmup + 1}/{args.steps}: {seconds:.3f} s", flush=True)
    print(f"torch median: {statistics.median(times):.3f} s ({args.threads} threads, "
          f"torch {torch.__version__})")


if __name__ == "__main__":
    main()
