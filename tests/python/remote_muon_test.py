"""RemoteMuon, the torch.optim optimizer, against a real muon-server."""
import copy
import unittest

import grpc
import torch

from muon_client import MuonServerError, RemoteMuon
from reference import AdamWReference, MuonReference, rel_err
from server_fixture import ServerProcess


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))


class RemoteMuonTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        self.seed = int(torch.seed() % (2 ** 31))
        self.x = torch.randn(64, 12)
        self.y = torch.randn(64, 3)

    def backward(self, model):
        loss = torch.nn.functional.mse_loss(model(self.x), self.y)
        loss.backward()
        return loss

    def test_routes_matrices_to_muon_and_vectors_to_adamw(self):
        model = make_model(self.seed)
        opt = RemoteMuon(model.parameters(), server=self.server.address, lr=0.05, adamw_lr=1e-3)
        kinds = {tuple(p.shape): p.kind for s in opt.sessions for p in s.info().params}
        from muon_client.client import pb
        self.assertEqual(kinds[(24, 12)], pb.OPTIMIZER_KIND_MUON)
        self.assertEqual(kinds[(3, 24)], pb.OPTIMIZER_KIND_MUON)
        self.assertEqual(kinds[(24,)], pb.OPTIMIZER_KIND_ADAMW)
        self.assertEqual(kinds[(3,)], pb.OPTIMIZER_KIND_ADAMW)

    def test_step_applies_reference_updates_in_place(self):
        model = make_model(self.seed)
        params = list(model.parameters())
        opt = RemoteMuon(params, server=self.server.address, lr=0.05, adamw_lr=1e-3,
                         weight_decay=0.1, adamw_weight_decay=0.1, adamw_betas=(0.9, 0.999),
                         adamw_eps=1e-8)
        refs = [MuonReference(p.shape, lr=0.05, weight_decay=0.1) if p.ndim >= 2 else
                AdamWReference(p.shape, lr=1e-3, weight_decay=0.1) for p in params]
        weights = [p.detach().double().numpy().copy() for p in params]
        for _ in range(3):
            opt.zero_grad()
            self.backward(model)
            for i, p in enumerate(params):
                decay, update = refs[i].step(p.grad.numpy())
                weights[i] = decay * weights[i] + update
            opt.step()
        for p, w in zip(params, weights):
            self.assertLess(rel_err(p.detach().numpy(), w), 1e-5, f"seed {self.seed}")

    def test_each_step_fills_the_buffers_of_the_one_before(self):
        # After a step is applied its receive and wire buffers go back to the
        # session, and the next step fills the same ones (streaming off and on).
        for streaming in (False, True):
            model = make_model(self.seed)
            opt = RemoteMuon(model.parameters(), server=self.server.address, lr=0.05,
                             adamw_lr=1e-3, stream_gradients=streaming)
            kept = []
            for _ in range(3):
                opt.zero_grad()
                self.backward(model)
                opt.step()
                kept.append({(k, kind, i): id(b) for k, s in enumerate(opt.sessions)
                             for kind, buffers in (("update", s._kept_updates),
                                                   ("wire", s._kept_wire))
                             for i, b in buffers.items()})
            self.assertEqual(len(kept[1]), 2 * sum(len(s.params) for s in opt.sessions), streaming)
            self.assertEqual(kept[2], kept[1], streaming)
            opt.close()

    def test_param_without_grad_is_left_alone(self):
        model = make_model(self.seed)
        frozen = model[2].weight
        frozen.requires_grad_(False)
        opt = RemoteMuon(model.parameters(), server=self.server.address)
        before = frozen.detach().clone()
        opt.zero_grad()
        self.backward(model)
        opt.step()
        self.assertTrue(torch.equal(frozen, before))
        sent = sum(len(summary.param_indices) for summary in opt.last_summaries)
        self.assertEqual(sent, 3)  # of 4 parameters

    def test_closure_and_lr_scheduler(self):
        model = make_model(self.seed)
        twin = copy.deepcopy(model)
        opt = RemoteMuon(model.parameters(), server=self.server.address, lr=0.05, adamw_lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
        twin_opt = RemoteMuon(twin.parameters(), server=self.server.address, lr=0.025,
                              adamw_lr=5e-4)

        def closure():
            opt.zero_grad()
            return self.backward(model)

        loss = opt.step(closure)
        self.assertIsInstance(loss, torch.Tensor)
        twin_opt.zero_grad()
        self.backward(twin)
        twin_opt.step()
        sched.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            # lr × 0.5 through lr_scale equals lr/2 from the start: the same
            # float64 product on the server, so the same fp32 update.
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    def test_bfloat16_wire(self):
        model = make_model(self.seed)
        twin = copy.deepcopy(model)
        opt = RemoteMuon(model.parameters(), server=self.server.address, wire_dtype="bfloat16")
        ref = RemoteMuon(twin.parameters(), server=self.server.address)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            self.backward(m)
            o.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            self.assertLess(rel_err(a.detach().numpy(), b.detach().double().numpy()), 1e-2)

    def test_state_dict_round_trip(self):
        control = make_model(self.seed)
        resumed = make_model(self.seed)
        control_opt = RemoteMuon(control.parameters(), server=self.server.address)
        first_opt = RemoteMuon(resumed.parameters(), server=self.server.address)
        for step in range(3):
            for model, opt in ((control, control_opt), (resumed, first_opt)):
                opt.zero_grad()
                self.backward(model)
                opt.step()
            if step == 1:
                # A restarted trainer: a new optimizer loads the state dict and
                # continues on the server state the first one left.
                state = first_opt.state_dict()
                first_opt = RemoteMuon(resumed.parameters(), server=self.server.address)
                first_opt.load_state_dict(state)
                self.assertEqual(first_opt.step_number, 2)
        for a, b in zip(control.parameters(), resumed.parameters()):
            self.assertTrue(torch.equal(a, b))

    def test_server_error_raises(self):
        model = make_model(self.seed)
        opt = RemoteMuon(model.parameters(), server=self.server.address)
        opt.zero_grad()
        self.backward(model)
        next(model.parameters()).grad[0, 0] = float("inf")
        with self.assertRaises(MuonServerError) as ctx:
            opt.step()
        self.assertEqual(ctx.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("Inf", ctx.exception.details)


if __name__ == "__main__":
    unittest.main()
