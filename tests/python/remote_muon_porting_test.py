"""RemoteMuon as a drop-in for torch.optim.Muon and KellerJordan's
MuonWithAuxAdam, and as a torch.optim.Optimizer: constructors, group keys,
the default split, schedulers, add_param_group, logging, lifecycle."""
import copy
import io
import math
import pickle
import unittest

import grpc
import numpy as np
import torch

from muon_client import MuonClient, MuonServerError, RemoteMuon, muon_param_groups
from muon_client.client import pb
from reference import AdamWReference, MuonReference, rel_err
from server_fixture import ServerProcess

JORDAN = (3.4445, -4.7750, 2.0315)
# A custom three-step schedule: dion's first two tuples, then Jordan's.
CUSTOM = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), JORDAN]
# The loss times this gives gradients of about eps = 1e-5 (norms 1e-5 to
# 2e-5), where eps moves the result: eps=1e-7 instead changes the loss by 40
# times the tolerance by step 16 (tried in float64).
GRAD_SCALE = 1e-4


# --------------------------------------------------------------------------
# Local references, written from the two codes' formulas in float64.

def newton_schulz(m, coefficients, steps, normalise):
    """coefficients: one (a, b, c) for every step, or one per step."""
    x = m
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = normalise(x)
    per_step = [coefficients] * steps if isinstance(coefficients[0], float) else coefficients
    for a, b, c in per_step:
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


class TorchMuonFormulas(torch.optim.Optimizer):
    """torch.optim.Muon: B ← μB + (1−μ)g (lerp), Nesterov g + μ(B − g),
    X/max(‖X‖, ε), θ ← θ(1 − γλ) − AdjustLR(γ)·O."""

    def __init__(self, params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps,
                 ns_steps, adjust_lr_fn):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_coefficients=ns_coefficients,
                                      eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))
        self.normalise = None  # torch's X/max(‖X‖, ε) unless set

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                o = newton_schulz(update, group["ns_coefficients"], group["ns_steps"],
                                  self.normalise or
                                  (lambda x: x / x.norm().clamp(min=group["eps"])))
                a, b = p.shape
                if group["adjust_lr_fn"] == "match_rms_adamw":
                    adjusted = lr * 0.2 * math.sqrt(max(a, b))
                else:
                    adjusted = lr * math.sqrt(max(1, a / b))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(o, alpha=-adjusted)


class KellerJordanFormulas(torch.optim.Optimizer):
    """SingleDeviceMuonWithAuxAdam: use_muon groups get Muon (lerp momentum,
    Nesterov, X/(‖X‖ + 1e-7), five Jordan steps, scale √max(1, rows/cols)),
    the others Adam with bias correction; both decay θ ← θ(1 − lr·wd)."""

    def __init__(self, groups):
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                if group["use_muon"]:
                    beta = group["momentum"]
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - beta)
                    update = p.grad.lerp(buf, beta)
                    o = newton_schulz(update, JORDAN, 5, lambda x: x / (x.norm() + 1e-7))
                    o = o * max(1, p.shape[-2] / p.shape[-1]) ** 0.5
                else:
                    b1, b2 = group["betas"]
                    state["step"] = state.get("step", 0) + 1
                    m = state.setdefault("exp_avg", torch.zeros_like(p))
                    v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
                    m.lerp_(p.grad, 1 - b1)
                    v.lerp_(p.grad.square(), 1 - b2)
                    o = (m / (1 - b1 ** state["step"])) / (
                        (v / (1 - b2 ** state["step"])).sqrt() + group["eps"])
                p.mul_(1 - lr * wd)
                p.add_(o, alpha=-lr)


class TokenNet(torch.nn.Module):
    """An embedding, two hidden matrices and an output head."""

    def __init__(self, vocab=40, dim=16, hidden=24):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.hidden = torch.nn.Linear(dim, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.hidden2 = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens):
        h = self.embed(tokens).mean(dim=1)
        h = self.norm(torch.tanh(self.hidden(h)))
        return self.head(torch.tanh(self.hidden2(h)))


def matrix_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(32, 20, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(20, 4, bias=False))


# Loss curves of the server (fp32) and a float64 reference may differ by
# this fraction of the first loss at any step: fp32 rounding compounded over
# the run is far below it, a wrong formula (no Nesterov, another lr
# adjustment, a missing decay or bias correction) far above (tried).
LOSS_TOLERANCE = 1e-3


class PortingTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess()
        cls.client = MuonClient(cls.server.address)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def setUp(self):
        self.seed = int(torch.seed() % (2 ** 31))

    def remote(self, params, *args, **kwargs):
        opt = RemoteMuon(params, *args, server=self.server.address, **kwargs)
        self.addCleanup(opt.close)
        return opt

    def session_count(self):
        return len(self.client.list_sessions())

    def assert_same_losses(self, remote_losses, local_losses):
        first = remote_losses[0]
        diff = max(abs(a - b) for a, b in zip(remote_losses, local_losses))
        print(f"first loss {first:.4f}, last {remote_losses[-1]:.4f}, largest |diff| {diff:.2e}")
        self.assertLess(diff, LOSS_TOLERANCE * first,
                        f"seed {self.seed}: remote {remote_losses} local {local_losses}")
        self.assertLess(remote_losses[-1], 0.8 * first, "the model must train")

    # ---------------------------------------------------------- constructors

    def test_torch_muon_constructor_trains_like_its_formulas(self):
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(96, 12, generator=g)
        y = torch.tanh(x @ torch.randn(12, 4, generator=g))
        configs = [dict(lr=0.02, weight_decay=0.05, momentum=0.9, nesterov=True,
                        ns_coefficients=JORDAN, eps=1e-7, ns_steps=5,
                        adjust_lr_fn="match_rms_adamw"),
                   dict(lr=0.03, weight_decay=0.1, momentum=0.95, nesterov=False,
                        ns_coefficients=JORDAN, eps=1e-7, ns_steps=4, adjust_lr_fn="original")]
        for hp in configs:
            with self.subTest(**hp):
                losses = {}
                for which in ("remote", "local"):
                    model = matrix_net(self.seed)
                    if which == "local":
                        model = model.double()
                        opt = TorchMuonFormulas(model.parameters(), **hp)
                    else:
                        opt = self.remote(model.parameters(), **hp)
                    # eta_min > 0 moves the lr by another factor than 1 each step.
                    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20,
                                                                       eta_min=0.004)
                    xs, ys = (x.double(), y.double()) if which == "local" else (x, y)
                    curve = []
                    for _ in range(20):
                        opt.zero_grad()
                        loss = torch.nn.functional.mse_loss(model(xs), ys)
                        loss.backward()
                        opt.step()
                        sched.step()
                        curve.append(loss.item())
                    losses[which] = curve
                self.assert_same_losses(losses["remote"], losses["local"])

    def kj_groups(self, model):
        hidden = [model.hidden.weight, model.hidden2.weight]
        scalars = [p for p in model.parameters() if p.ndim < 2]
        adam = [dict(params=[model.head.weight], lr=0.01),
                dict(params=[model.embed.weight], lr=0.05, weight_decay=0.01)]
        adam = [dict(**g, betas=(0.8, 0.95), eps=1e-10, use_muon=False) for g in adam]
        # Left to the code's per-group defaults: the scalars' lr, betas, eps
        # and weight decay, the Muon group's weight decay.
        return [*adam, dict(params=scalars, use_muon=False),
                dict(params=hidden, lr=0.05, momentum=0.95, use_muon=True)]

    def test_keller_jordan_groups_train_like_their_formulas(self):
        g = torch.Generator().manual_seed(self.seed)
        tokens = torch.randint(0, 40, (128, 6), generator=g)
        labels = torch.randint(0, 40, (128,), generator=g)
        losses = {}
        for which in ("remote", "local"):
            torch.manual_seed(self.seed)
            model = TokenNet()
            if which == "local":
                model = model.double()
                groups = self.kj_groups(model)
                for group in groups:  # the defaults SingleDeviceMuonWithAuxAdam fills in
                    defaults = (dict(lr=0.02, momentum=0.95, weight_decay=0) if group["use_muon"]
                                else dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0))
                    for k, v in defaults.items():
                        group.setdefault(k, v)
                opt = KellerJordanFormulas(groups)
            else:
                opt = self.remote(self.kj_groups(model))
            curve = []
            for _ in range(25):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(tokens), labels)
                loss.backward()
                opt.step()
                curve.append(loss.item())
            losses[which] = curve
        self.assert_same_losses(losses["remote"], losses["local"])

    def test_keller_jordan_group_defaults_reach_the_server(self):
        torch.manual_seed(self.seed)
        model = TokenNet()
        opt = self.remote(self.kj_groups(model))
        by_group = {s.info().params[0].name: s.info().params[0].hyper_params
                    for s in opt.sessions}
        muon = by_group["group3.param0"]
        self.assertEqual((muon.lr, muon.momentum, muon.weight_decay), (0.05, 0.95, 0.0))
        scalars = by_group["group2.param0"]
        self.assertEqual((scalars.lr, scalars.adam_beta1, scalars.adam_beta2, scalars.adam_eps,
                          scalars.weight_decay), (3e-4, 0.9, 0.95, 1e-10, 0.0))
        self.assertEqual(opt.param_groups[3]["weight_decay"], 0)
        self.assertTrue(opt.param_groups[3]["use_muon"])

    def test_torch_defaults_and_adamw_arguments_with_groups(self):
        model = TokenNet()
        groups = [{"params": [model.hidden.weight], "kind": "muon"},
                  {"params": [model.hidden.bias], "kind": "adamw"}]
        opt = self.remote(groups, adamw_lr=2e-3, adamw_betas=(0.85, 0.99))
        muon, adamw = (s.info().params[0].hyper_params for s in opt.sessions)
        # torch.optim.Muon's defaults; the AdamW group takes adamw_lr although
        # groups were given.
        self.assertEqual((muon.lr, muon.weight_decay, muon.momentum, muon.nesterov, muon.ns_steps,
                          muon.shape_scale), (1e-3, 0.1, 0.95, True, 5, pb.SHAPE_SCALE_SPECTRAL))
        self.assertEqual((adamw.lr, adamw.adam_beta1, adamw.adam_beta2, adamw.weight_decay),
                         (2e-3, 0.85, 0.99, 0.0))
        self.assertNotIn("momentum", opt.param_groups[1])
        self.assertNotIn("betas", opt.param_groups[0])
        # torch.optim.Muon's positions: lr, weight_decay, momentum, nesterov.
        positional = self.remote([model.hidden2.weight], 0.03, 0.2, 0.9, False)
        hp = positional.sessions[0].info().params[0].hyper_params
        self.assertEqual((hp.lr, hp.weight_decay, hp.momentum, hp.nesterov),
                         (0.03, 0.2, 0.9, False))

    def test_ns_coefficients_eps_and_adjust_lr_fn_reach_the_server(self):
        w = torch.nn.Parameter(torch.randn(8, 6))
        opt = self.remote([w], ns_coefficients=CUSTOM, ns_steps=3, eps=1e-5,
                          adjust_lr_fn="match_rms_adamw")
        hp = opt.sessions[0].info().params[0].hyper_params
        self.assertEqual([(t.a, t.b, t.c) for t in hp.ns_coefficients], CUSTOM)
        self.assertEqual((hp.ns_schedule, hp.ns_steps, hp.ns_eps, hp.shape_scale),
                         (pb.NS_SCHEDULE_JORDAN, 3, 1e-5, pb.SHAPE_SCALE_RMS_MATCH))
        single = self.remote([w], ns_coefficients=(3.0, -3.2, 1.2), ns_steps=7)
        hp = single.sessions[0].info().params[0].hyper_params
        self.assertEqual(([(t.a, t.b, t.c) for t in hp.ns_coefficients], hp.ns_steps),
                         ([(3.0, -3.2, 1.2)], 7))

    def test_a_bad_schedule_or_eps_is_refused_with_a_clear_error(self):
        w = torch.nn.Parameter(torch.randn(8, 6))
        before = self.session_count()
        for kwargs, error, message in (
                (dict(ns_coefficients=[(3.0, -3.2, math.nan)] * 3, ns_steps=3), MuonServerError,
                 "ns_coefficients step 0 .* must be finite"),
                (dict(ns_coefficients=CUSTOM, ns_steps=5), MuonServerError,
                 "ns_coefficients has 3 per-step triples but ns_steps is 5"),
                (dict(ns_coefficients=[(3.0, -3.2, 1.2)] * 101), MuonServerError,
                 "ns_coefficients' length is 101"),
                (dict(ns_coefficients=[(3.0, -3.2)]), ValueError, "expected one \\(a, b, c\\)"),
                (dict(eps=0.0), MuonServerError, "ns_eps is 0; it must be finite and > 0"),
                (dict(eps=math.inf), MuonServerError, "ns_eps is inf"),
                (dict(adjust_lr_fn="spectral"), ValueError, "adjust_lr_fn")):
            with self.subTest(**kwargs), self.assertRaisesRegex(error, message):
                RemoteMuon([w], server=self.server.address, **kwargs)
        self.assertEqual(self.session_count(), before)

    def test_custom_schedule_and_eps_train_like_their_formulas(self):
        # Gradients are scaled to about eps (the loss is multiplied by
        # GRAD_SCALE), so eps moves the normalisation and a server that
        # ignored it (or kept 1e-7) would train differently.
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(96, 12, generator=g)
        y = torch.tanh(x @ torch.randn(12, 4, generator=g))
        hp = dict(lr=0.02, weight_decay=0.05, momentum=0.9, nesterov=True,
                  ns_coefficients=CUSTOM, eps=1e-5, ns_steps=3, adjust_lr_fn="original")
        losses = {}
        for which in ("remote", "local"):
            model = matrix_net(self.seed)
            if which == "local":
                model = model.double()
                opt = TorchMuonFormulas(model.parameters(), **hp)
                # The server's normalisation, X/(‖X‖ + eps) (docs/math.md).
                opt.normalise = lambda m: m / (m.norm() + hp["eps"])
            else:
                opt = self.remote(model.parameters(), **hp)
            xs, ys = (x.double(), y.double()) if which == "local" else (x, y)
            curve = []
            for _ in range(20):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(xs), ys)
                (loss * GRAD_SCALE).backward()
                opt.step()
                curve.append(loss.item())
            losses[which] = curve
        self.assert_same_losses(losses["remote"], losses["local"])

    # ------------------------------------------------------ no silent config

    def test_unknown_group_keys_are_a_type_error_naming_the_valid_ones(self):
        model = TokenNet()
        before = self.session_count()
        cases = [
            ([{"params": [model.hidden.weight], "weight_dacay": 0.1}], "weight_dacay"),
            ([{"params": [model.hidden.weight], "use_muon": True, "betas": (0.9, 0.95)}],
             "betas"),
            ([{"params": [model.hidden.bias], "use_muon": False, "momentum": 0.9}], "momentum"),
            ([{"params": [model.hidden.weight, model.hidden.bias]}], "mixes matrices"),
            ([{"params": [model.hidden.weight], "kind": "adamw", "use_muon": True}],
             "contradicts"),
        ]
        for groups, bad in cases:
            with self.subTest(bad), self.assertRaises(TypeError) as ctx:
                RemoteMuon(groups, server=self.server.address)
            self.assertIn(bad, str(ctx.exception))
        with self.assertRaises(TypeError) as ctx:
            RemoteMuon([{"params": [model.hidden.weight], "weight_dacay": 0.1}],
                       server=self.server.address)
        self.assertIn("'weight_decay'", str(ctx.exception))  # names the valid keys
        self.assertEqual(self.session_count(), before)

    def test_muon_param_groups_keeps_embeddings_and_the_head_on_adamw(self):
        model = TokenNet()
        groups = muon_param_groups(model)
        by_kind = {g["kind"]: set(g["param_names"]) for g in groups}
        self.assertEqual(by_kind["muon"], {"hidden.weight", "hidden2.weight"})
        self.assertEqual(by_kind["adamw"], {"embed.weight", "head.weight", "head.bias",
                                            "hidden.bias", "hidden2.bias", "norm.weight",
                                            "norm.bias"})
        chosen = {g["kind"]: set(g["param_names"])
                  for g in muon_param_groups(model, head=model.hidden2)}
        self.assertIn("head.weight", chosen["muon"])
        self.assertIn("hidden2.weight", chosen["adamw"])
        tied = TokenNet(dim=24)
        tied.head.weight = tied.embed.weight  # weight tying: one tensor, on AdamW
        names = {g["kind"]: g["param_names"] for g in muon_param_groups(tied)}
        self.assertIn("embed.weight", names["adamw"])
        self.assertNotIn("head.weight", names["muon"])
        # A module passed as params is split the same way.
        opt = self.remote(model)
        kinds = {p.name: p.kind for s in opt.sessions for p in s.info().params}
        self.assertEqual(kinds["embed.weight"], pb.OPTIMIZER_KIND_ADAMW)
        self.assertEqual(kinds["head.weight"], pb.OPTIMIZER_KIND_ADAMW)
        self.assertEqual(kinds["hidden.weight"], pb.OPTIMIZER_KIND_MUON)

    def test_one_log_line_per_group_and_repr(self):
        model = TokenNet()
        with self.assertLogs("muon_client", "INFO") as logs:
            opt = self.remote(model, lr=0.02, adamw_lr=1e-3)
        self.assertEqual(len(logs.records), 2, logs.output)
        muon_line, adamw_line = (r.getMessage() for r in logs.records)
        self.assertIn("muon, 2 params, lr=0.02", muon_line)
        self.assertIn("momentum=0.95", muon_line)
        self.assertNotIn("betas", muon_line)
        self.assertIn("adamw, 7 params, lr=0.001", adamw_line)
        self.assertIn("betas=(0.9, 0.95)", adamw_line)
        self.assertNotIn("momentum", adamw_line)
        text = repr(opt)
        self.assertIn(self.server.address, text)
        for session in opt.sessions:
            self.assertIn(session.session_id, text)
        self.assertIn(muon_line, text)

    def test_wire_dtype_takes_torch_dtypes(self):
        model = TokenNet()
        groups = muon_param_groups(model)
        groups[1]["wire_dtype"] = torch.float16
        opt = self.remote(groups, wire_dtype=torch.bfloat16)
        dtypes = [s.info().params[0].dtype for s in opt.sessions]
        self.assertEqual(dtypes, [pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT16])
        with self.assertRaisesRegex(ValueError, "wire_dtype"):
            RemoteMuon(model, server=self.server.address, wire_dtype=torch.float64)

    # -------------------------------------------------- per-step hyper-params

    def test_each_group_follows_its_own_schedule_and_weight_decay(self):
        torch.manual_seed(self.seed)
        a = torch.nn.Parameter(torch.randn(16, 12))
        b = torch.nn.Parameter(torch.randn(10, 20))
        opt = self.remote([{"params": [a], "lr": 0.04, "weight_decay": 0.1},
                           {"params": [b], "lr": 0.02}], momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5 ** s, lambda s: 1 / (1 + s)])
        refs = [MuonReference(a.shape, momentum=0.9, weight_decay=0.1),
                MuonReference(b.shape, momentum=0.9, weight_decay=0.1)]
        weights = [a.detach().double().numpy().copy(), b.detach().double().numpy().copy()]
        for step in range(5):
            if step == 3:
                opt.param_groups[1]["weight_decay"] = 0.3  # read at every step
            for i, (p, group) in enumerate(zip((a, b), opt.param_groups)):
                p.grad = torch.randn_like(p)
                refs[i].wd = group["weight_decay"]
                decay, update = refs[i].step(p.grad.numpy(), lr=group["lr"])
                weights[i] = decay * weights[i] + update
            opt.step()
            sched.step()
            for p, w in zip((a, b), weights):
                self.assertLess(rel_err(p.detach().numpy(), w), 1e-5, f"seed {self.seed}")

    def test_momentum_nesterov_betas_and_eps_are_read_every_step(self):
        torch.manual_seed(self.seed)
        w = torch.nn.Parameter(torch.randn(12, 8))
        v = torch.nn.Parameter(torch.randn(8))
        opt = self.remote([w, v], lr=0.03, momentum=0.85, weight_decay=0.0, adamw_lr=1e-3,
                          adamw_betas=(0.9, 0.999), adamw_eps=1e-8)
        muon = MuonReference(w.shape, lr=0.03, momentum=0.85)
        adamw = AdamWReference(v.shape, lr=1e-3)
        weights = [w.detach().double().numpy().copy(), v.detach().double().numpy().copy()]
        for step in range(6):
            # Momentum warm-up as in modded-nanogpt, cycled betas as OneCycleLR's.
            muon.beta = opt.param_groups[0]["momentum"] = 0.85 + 0.02 * step
            if step == 3:
                muon.nesterov = opt.param_groups[0]["nesterov"] = False
            if step >= 2:
                opt.param_groups[1]["betas"] = (0.85, 0.99)
                adamw.b1, adamw.b2 = 0.85, 0.99
            if step == 4:
                adamw.eps = opt.param_groups[1]["eps"] = 1e-6
            w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
            for i, (ref, p) in enumerate(((muon, w), (adamw, v))):
                decay, update = ref.step(p.grad.numpy())
                weights[i] = decay * weights[i] + update
            opt.step()
            for p, want in zip((w, v), weights):
                self.assertLess(rel_err(p.detach().numpy(), want), 1e-5,
                                f"step {step}, seed {self.seed}")

    def test_changing_what_the_server_fixes_raises_and_sends_nothing(self):
        w = torch.nn.Parameter(torch.randn(8, 6))
        v = torch.nn.Parameter(torch.randn(6))
        opt = self.remote([w, v])
        for gi, key, value in ((0, "ns_steps", 4), (0, "adjust_lr_fn", "match_rms_adamw"),
                               (1, "wire_dtype", "bfloat16")):
            with self.subTest(key):
                group = opt.param_groups[gi]
                saved = dict(group)
                group[key] = value
                w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
                changed = "shape_scale" if key == "adjust_lr_fn" else key
                with self.assertRaisesRegex(ValueError, f"{changed} changed"):
                    opt.step()
                group.clear()
                group.update(saved)
        self.assertEqual([s.info().step for s in opt.sessions], [0, 0])
        opt.step()
        self.assertEqual([s.info().step for s in opt.sessions], [1, 1])

    def test_add_param_group_registers_and_trains_the_new_parameters(self):
        # A Muon group joins the live Muon session (AddParameters); the first
        # AdamW group gets a session of its own, the second joins that one.
        # Each keeps its own hyper-parameters, lr schedule included.
        torch.manual_seed(self.seed)
        a = torch.nn.Parameter(torch.randn(16, 12))
        b = torch.nn.Parameter(torch.randn(12, 8))
        d = torch.nn.Parameter(torch.randn(10))
        e = torch.nn.Parameter(torch.randn(6, 4))
        opt = self.remote([a], lr=0.05, weight_decay=0.0)
        refs = {"a": MuonReference(a.shape, lr=0.05)}
        params = {"a": a}
        weights = {"a": a.detach().double().numpy().copy()}
        adamw = dict(kind="adamw", betas=(0.9, 0.99), eps=1e-8)
        for step in range(6):
            if step == 2:
                opt.add_param_group({"params": [b], "lr": 0.03, "momentum": 0.9,
                                     "weight_decay": 0.2})
                refs["b"] = MuonReference(b.shape, lr=0.03, momentum=0.9, weight_decay=0.2)
                params["b"] = b
                self.assertEqual(len(opt.sessions), 1)
                self.assertEqual(opt.sessions[0].info().num_params, 2)
            if step == 3:
                opt.add_param_group(dict(adamw, params=[d], lr=0.004, weight_decay=0.1))
                refs["d"] = AdamWReference(d.shape, lr=0.004, betas=(0.9, 0.99), eps=1e-8,
                                           weight_decay=0.1)
                params["d"] = d
                self.assertEqual(len(opt.sessions), 2)
            if step == 4:
                opt.add_param_group(dict(adamw, params=[e], lr=0.002, weight_decay=0.0))
                refs["e"] = AdamWReference(e.shape, lr=0.002, betas=(0.9, 0.99), eps=1e-8)
                params["e"] = e
                self.assertEqual(len(opt.sessions), 2)
                # A scheduler moving one group of the shared session only.
                opt.param_groups[1]["lr"] = 0.01
                refs["b"].lr = 0.01
            for name, p in params.items():
                weights.setdefault(name, p.detach().double().numpy().copy())
                p.grad = torch.randn_like(p)
                decay, update = refs[name].step(p.grad.numpy())
                weights[name] = decay * weights[name] + update
            opt.step()
            for name, p in params.items():
                self.assertLess(rel_err(p.detach().numpy(), weights[name]), 1e-5,
                                f"{name} at step {step}")
        self.assertEqual([s.info().num_params for s in opt.sessions], [2, 2])
        self.assertEqual([s.info().step for s in opt.sessions], [6, 3])
        # The state dict covers the added parameters.
        state = opt.state_dict()
        self.assertEqual(sorted(state["state"]), [0, 1, 2, 3])
        self.assertEqual(float(state["state"][3]["step"]), 2.0)
        with self.assertRaises(TypeError):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 3))],
                                 "lr_typo": 1.0})
        self.assertEqual(len(opt.param_groups), 4)
        self.assertEqual([s.info().num_params for s in opt.sessions], [2, 2])

    # ------------------------------------------------------------- lifecycle

    def test_close_and_context_manager_delete_the_sessions(self):
        model = TokenNet()
        with RemoteMuon(model, server=self.server.address) as opt:
            ids = [(s.session_id, s.token) for s in opt.sessions]
            for session_id, token in ids:
                self.client.get_session(session_id, token)
        for session_id, token in ids:
            with self.assertRaises(MuonServerError) as ctx:
                self.client.get_session(session_id, token)
            self.assertEqual(ctx.exception.code, grpc.StatusCode.NOT_FOUND)
        opt.close()  # again: nothing left to do
        with self.assertRaisesRegex(RuntimeError, "closed"):
            opt.step()

    def test_pickle_and_copy_raise_a_clear_type_error(self):
        opt = self.remote(TokenNet())
        for how in (pickle.dumps, copy.copy, copy.deepcopy):
            with self.subTest(how.__name__), self.assertRaisesRegex(TypeError, "state_dict"):
                how(opt)

    def train_steps(self, model, opt, tokens, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(tokens).logsumexp(dim=1).mean().backward()
            opt.step()

    def test_state_dict_is_a_snapshot_in_torch_shape(self):
        torch.manual_seed(self.seed)
        model = TokenNet()
        tokens = torch.randint(0, 40, (16, 6))
        opt = self.remote(model)
        self.train_steps(model, opt, tokens, 3)
        state = opt.state_dict()
        names = [n for g in opt.param_groups for n in g["param_names"]]
        kinds = [g["kind"] for g in opt.param_groups for _ in g["params"]]
        self.assertEqual(sorted(state["state"]), list(range(len(names))))
        for index, entry in state["state"].items():
            if kinds[index] == "muon":
                self.assertEqual(sorted(entry), ["momentum_buffer"], names[index])
            else:
                self.assertEqual(sorted(entry), ["exp_avg", "exp_avg_sq", "step"], names[index])
                self.assertEqual(float(entry["step"]), 3.0)
        self.assertEqual(state["remote"], {"step": 3})
        for session in opt.sessions:  # no session pointer, no token
            self.assertNotIn(session.token, repr(state))
        # A snapshot: stepping on does not change what was saved.
        saved = {i: {k: v.clone() for k, v in e.items()} for i, e in state["state"].items()}
        self.train_steps(model, opt, tokens, 1)
        for i, entry in saved.items():
            for k, v in entry.items():
                self.assertTrue(torch.equal(state["state"][i][k], v))

    def test_load_state_dict_continues_bit_identically_on_another_server(self):
        other = ServerProcess()
        self.addCleanup(other.stop)
        torch.manual_seed(self.seed)
        model = TokenNet()
        tokens = torch.randint(0, 40, (16, 6))
        opt = self.remote(model, lr=0.03, adamw_lr=1e-3)
        self.train_steps(model, opt, tokens, 3)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        self.train_steps(model, opt, tokens, 3)  # the original runs on to step 6
        for where in (self.server.address, other.address):
            with self.subTest(where):
                buffer.seek(0)
                saved = torch.load(buffer)
                resumed = TokenNet()
                resumed.load_state_dict(saved["model"])
                opt2 = RemoteMuon(resumed, server=where)  # other defaults: the state dict's win
                self.addCleanup(opt2.close)
                opt2.load_state_dict(saved["opt"])
                self.assertEqual(opt2.step_number, 3)
                self.assertEqual(opt2.param_groups[0]["lr"], 0.03)
                self.train_steps(resumed, opt2, tokens, 3)
                for p, q in zip(model.parameters(), resumed.parameters()):
                    self.assertTrue(torch.equal(p, q), f"seed {self.seed}")

    def test_loads_a_keller_jordan_state_dict(self):
        g = torch.Generator().manual_seed(self.seed)
        tokens = torch.randint(0, 40, (128, 6), generator=g)
        labels = torch.randint(0, 40, (128,), generator=g)

        def train(model, opt, steps):
            curve = []
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(tokens), labels)
                loss.backward()
                opt.step()
                curve.append(loss.item())
            return curve

        torch.manual_seed(self.seed)
        local = TokenNet().double()
        groups = self.kj_groups(local)
        for group in groups:
            for k, v in (dict(lr=0.02, momentum=0.95, weight_decay=0) if group["use_muon"] else
                         dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0)).items():
                group.setdefault(k, v)
        local_opt = KellerJordanFormulas(groups)
        train(local, local_opt, 5)
        # A checkpoint of the local run, continued on the server.
        remote = TokenNet()
        remote.load_state_dict({k: v.float() for k, v in local.state_dict().items()})
        opt = self.remote(self.kj_groups(remote))
        opt.load_state_dict(local_opt.state_dict())
        self.assertEqual(opt.step_number, 0)
        self.assert_same_losses(train(remote, opt, 10), train(local, local_opt, 10))

    def test_a_bad_state_dict_changes_nothing(self):
        model = TokenNet()
        opt = self.remote(model)
        good = opt.state_dict()
        sessions = [s.session_id for s in opt.sessions]
        before = self.session_count()
        wrong_shape = copy.deepcopy(good)
        wrong_shape["state"] = {0: {"momentum_buffer": torch.zeros(3, 3)}}
        missing = copy.deepcopy(good)
        missing["state"] = {8: {"exp_avg": torch.zeros(40)}}
        for bad, message in ((wrong_shape, "shape"), (missing, "lacks")):
            with self.subTest(message), self.assertRaisesRegex(ValueError, message):
                opt.load_state_dict(bad)
            self.assertEqual([s.session_id for s in opt.sessions], sessions)
            self.assertEqual(self.session_count(), before)

    def test_handles_reattach_to_live_sessions(self):
        torch.manual_seed(self.seed)
        model = TokenNet()
        twin = copy.deepcopy(model)
        tokens = torch.randint(0, 40, (16, 6))
        opts = [self.remote(model), self.remote(twin)]
        for step in range(3):
            if step == 2:
                handles = opts[1].handles()
                opts[1].close(delete=False)  # as a trainer that stopped
                opts[1] = self.remote(twin)
                opts[1].attach(handles)
            for m, o in zip((model, twin), opts):
                self.train_steps(m, o, tokens, 1)
        for p, q in zip(model.parameters(), twin.parameters()):
            self.assertTrue(torch.equal(p, q))
        np.testing.assert_array_equal([s.info().step for s in opts[1].sessions], [3, 3])


if __name__ == "__main__":
    unittest.main()
