"""CPU emulation of the CUDA engine's Gram Newton–Schulz in fp16 (fp32 products, each
output rounded to fp16), with whole r×r products and with the half-Gram block products
(kernels/cuda/ns_cuda.cc, HalfSquare), against the fp32 plain iteration: jordan, 5 steps,
one Gaussian 1024×4096 matrix, with the default restart after step 3 and without one.
docs/numerics.md, "Gram Newton–Schulz", cites its output. Run: /usr/bin/python3 bench/gpu/gram_half_sim.py"""
import torch
torch.manual_seed(0)
r, c = 1024, 4096
h = r // 2
co = [(3.4445, -4.7750, 2.0315)] * 5
M = torch.randn(r, c).to(torch.bfloat16).float()
X0 = M / (M.norm() * 1.01 + 1e-7)
f16 = lambda t: t.half().float()
def plain32(X):
    X = X.clone()
    for a, b, cc in co:
        A = X @ X.T; B = b * A + cc * A @ A; X = a * X + B @ X
    return X
def prod(F, S, alpha=1.0, beta=0.0, C=None, half=False):
    D = alpha * (F @ S) + (beta * C if C is not None else 0)
    if half:
        # what the block kernel computes: D00 = F_top S_topT, D01 = F_top S_right, D11 = F_rightT S_right
        D00 = alpha * F[:h] @ S[:h].T; D01 = alpha * F[:h] @ S[:, h:]; D11 = alpha * F[:, h:].T @ S[:, h:]
        if C is not None:
            D00 = D00 + beta * C[:h, :h]; D01 = D01 + beta * C[:h, h:]; D11 = D11 + beta * C[h:, h:]
        D = torch.full((r, r), float('nan'))
        D[:h, :h] = D00; D[:h, h:] = D01; D[h:, h:] = D11
        # The engine never reads D10; here the mirror of D01 stands in, so the
        # whole-matrix operations of the emulation (F @ S) see the same values.
        D[h:, :h] = D01.T
    return f16(D)
def gram(X, restarts, half):
    X = f16(X)
    ends = sorted(set(k for k in restarts if 0 < k < len(co))) + [len(co)]
    first = 0
    for end in ends:
        R = f16(X @ X.T)
        if half:
            R[h:, :h] = R[:h, h:].T
        for j in range(first, end):
            a, b, cc = co[j]
            Z = prod(R, R, cc, b, R, half)
            P = f16(Z + a * torch.eye(r)) if j == first else prod(P, Z, 1.0, a, P, half)
            if j + 1 < end:
                W = prod(Z, Z, 1.0, 2 * a, Z, half)
                R = prod(W, R, 1.0, a * a, R, half)
        X = f16(P @ X)
        first = end
    return X
want = plain32(X0)
for name, rs in [("restart", [3]), ("no restart", [])]:
    for half in (False, True):
        got = gram(X0, rs, half)
        print(name, "half" if half else "full", "%.3e" % ((got - want).norm() / want.norm()).item())
