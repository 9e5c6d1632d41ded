#!/usr/bin/env python3
"""PyTorch Newton-Schulz on the docs/performance.md workloads (the comparison for
ns_bench), and the table that puts the two side by side.

  torch_ns.py [--ours ours.json] [--json torch.json] [--iters N]

Variants, 5 jordan steps in bf16 (Keller Jordan's reference code): per-matrix
eager, batched by shape eager, and batched by shape under torch.compile; the
best of them is "PyTorch best". Timed with CUDA events, median, after warm-up,
rotating over several freshly drawn input sets.
"""
import argparse
import json
import statistics

import torch

WORKLOADS = {
    "gpt2-small": [(768, 2304, 12), (768, 768, 12), (3072, 768, 12), (768, 3072, 12)],
    "gpt2-medium": [(1024, 3072, 24), (1024, 1024, 24), (4096, 1024, 24), (1024, 4096, 24)],
    "llama-1b": [(2048, 2048, 32), (512, 2048, 32), (8192, 2048, 32), (2048, 8192, 16)],
    "512x256^2": [(256, 256, 512)],
}
# docs/performance.md, "Workloads": PyTorch best, Turbo-Muon 5-step, Turbo-Muon AOL 4-step (ms).
DESIGN = {
    "gpt2-small": (6.2, 4.22, 3.13),
    "gpt2-medium": (22.2, 15.1, 11.4),
    "llama-1b": (108.0, 72.4, 56.9),
    "512x256^2": (2.65, 1.73, 1.18),
}


def ns(G, steps=5):
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


ns_compiled = torch.compile(ns)


def median_ms(fn, sets, warmup, iters):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + iters):
        data = sets[i % len(sets)]
        torch.cuda.synchronize()
        start.record()
        fn(data)
        stop.record()
        stop.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def gemm_tflops():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda _: a @ b, [None], 3, 20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bench_workload(shapes, iters):
    # Three input sets, each one batch per shape, fresh random data.
    sets = [[torch.randn(cnt, m, n, device="cuda", dtype=torch.bfloat16) for m, n, cnt in shapes]
            for _ in range(3)]
    per_matrix = lambda d: [ns(x) for batch in d for x in batch]
    batched = lambda d: [ns(batch) for batch in d]
    compiled = lambda d: [ns_compiled(batch) for batch in d]
    out = {}
    for name, fn in (("eager per-matrix", per_matrix), ("eager batched", batched),
                     ("compiled batched", compiled)):
        out[name] = median_ms(fn, sets, 3, iters)
    del sets
    torch.cuda.empty_cache()
    return out


def flops(shapes, steps):
    total = 0
    for m, n, cnt in shapes:
        r, c = min(m, n), max(m, n)
        total += steps * cnt * (4 * r * r * c + 2 * r**3)
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ours", help="ns_bench --json output")
    p.add_argument("--json", help="write PyTorch figures here")
    p.add_argument("--iters", type=int, default=15)
    args = p.parse_args()

    tflops = gemm_tflops()
    print(f"PyTorch {torch.__version__}, {torch.cuda.get_device_name()}: "
          f"bf16 8192^3 GEMM {tflops:.0f} TFLOP/s")
    results = {}
    for w, shapes in WORKLOADS.items():
        r = bench_workload(shapes, args.iters)
        best = min(r, key=r.get)
        results[w] = {"variants": r, "best": best, "best_ms": r[best]}
        print(f"{w:12s} " + "  ".join(f"{k}: {v:.3f} ms" for k, v in r.items()) + f"  -> {best}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemm_tflops": tflops, "workloads": results}, f, indent=1)
    if not args.ours:
        return
    with open(args.ours) as f:
        ours = json.load(f)
    rate = ours["gemm_tflops"]
    print(f"\nOurs on {ours['gpu']}; cuBLASLt bf16 GEMM {rate:.0f} TFLOP/s (PyTorch {tflops:.0f}).")
    print("target = Turbo-Muon (docs/performance.md; 5-step for jordan/polar_express, AOL 4-step for aol),"
          " scaled by our PyTorch/that table's PyTorch where those differ by >10%.")
    hdr = ("| workload | schedule | ours ms (graph; full / half Gram) | PyTorch best ms | PyTorch/ours |"
           " target ms | vs target | floor ms @measured | floor ms @800 | ours % of floor |")
    print(hdr)
    print("|" + " --- |" * (hdr.count("|") - 1))
    for row in ours["rows"]:
        w = row["workload"]
        ms = row["eager_ms"]  # what the engine runs
        pt = results[w]["best_ms"]
        pt_design, turbo5, turbo_aol = DESIGN[w]
        scale = pt / pt_design if abs(pt / pt_design - 1) > 0.10 else 1.0
        target = (turbo_aol if row["schedule"] == "aol" else turbo5) * scale
        fl = flops([(m, n, c) for m, n, c in WORKLOADS[w]], row["steps"])
        floor_measured = fl / (rate * 1e12) * 1e3
        floor_800 = fl / 800e12 * 1e3
        print(f"| {w} | {row['schedule']} ({row['steps']}) | {ms:.3f} ({row['graph_ms']:.3f}; "
              f"{row['full_gram_ms']:.3f} / {row['half_gram_ms']:.3f}) | {pt:.3f} ({results[w]['best']}) | {pt / ms:.2f}x |"
              f" {target:.2f}{' (scaled)' if scale != 1.0 else ''} |"
              f" {'beats' if ms < target else 'misses'} by {abs(ms / target - 1) * 100:.0f}% |"
              f" {floor_measured:.3f} | {floor_800:.3f} | {floor_measured / ms * 100:.0f}% |")


if __name__ == "__main__":
    main()
