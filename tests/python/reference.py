"""Muon and AdamW in float64 numpy, from docs/math.md's formulas, for checking
what the server returns."""
import numpy as np

JORDAN = (3.4445, -4.7750, 2.0315)


def newton_schulz(m, steps=5, coeffs=JORDAN):
    x = np.asarray(m, dtype=np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    a, b, c = coeffs
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


class MuonReference:
    def __init__(self, shape, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0):
        self.buf = np.zeros(shape)
        self.lr, self.beta, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay

    def step(self, grad, lr=None):
        lr = self.lr if lr is None else lr
        g = np.asarray(grad, dtype=np.float64)
        self.buf = self.beta * self.buf + (1 - self.beta) * g
        m = (1 - self.beta) * g + self.beta * self.buf if self.nesterov else self.buf
        rows, cols = m.shape
        scale = np.sqrt(max(1.0, rows / cols))
        return 1 - lr * self.wd, -lr * scale * newton_schulz(m)


class AdamWReference:
    def __init__(self, shape, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)
        self.t = 0
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay

    def step(self, grad):
        g = np.asarray(grad, dtype=np.float64)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        mhat = self.m / (1 - self.b1 ** self.t)
        vhat = self.v / (1 - self.b2 ** self.t)
        return 1 - self.lr * self.wd, -self.lr * mhat / (np.sqrt(vhat) + self.eps)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
