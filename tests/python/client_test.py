"""The plain numpy client against a real muon-server."""
import unittest

import grpc
import numpy as np

from muon_client import MuonClient, MuonServerError, ParamSpec
from muon_client.client import from_wire, pb, to_wire
from reference import AdamWReference, MuonReference, rel_err
from server_fixture import CuttingProxy, ServerProcess



class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess()
        cls.client = MuonClient(cls.server.address)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def setUp(self):
        seed = np.random.SeedSequence().entropy
        self.rng = np.random.default_rng(seed)
        self._seed = seed

    def grad(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def test_steps_match_float64_reference(self):
        session = self.client.create_session(
            [ParamSpec("w", (48, 32)), ParamSpec("b", (32,))], lr=0.02, weight_decay=0.1,
            adamw={"lr": 1e-3})
        muon = MuonReference((48, 32), lr=0.02, weight_decay=0.1)
        adamw = AdamWReference((32,), lr=1e-3, weight_decay=0.1)
        for step in range(1, 6):
            gw, gb = self.grad(48, 32), self.grad(32)
            result = session.step({0: gw, 1: gb})
            self.assertEqual(result.step, step)
            decay_w, update_w = muon.step(gw)
            decay_b, update_b = adamw.step(gb)
            # fp32 Newton–Schulz on the server vs float64 here.
            self.assertLess(rel_err(result.updates[0], update_w), 1e-4, self._seed)
            self.assertLess(rel_err(result.updates[1], update_b), 1e-5, self._seed)
            self.assertAlmostEqual(result.decay[0], decay_w, places=12)
            self.assertAlmostEqual(result.decay[1], decay_b, places=12)

    def test_bfloat16_and_float16_wire(self):
        shape = (64, 40)
        sessions = {dt: self.client.create_session([ParamSpec("w", shape, dtype=dt)])
                    for dt in ("float32", "bfloat16", "float16")}
        g = self.grad(*shape)
        updates = {dt: s.step({0: g}).updates[0] for dt, s in sessions.items()}
        # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3) on the
        # gradient and again on the update; fp16 keeps 11.
        self.assertLess(rel_err(updates["bfloat16"], updates["float32"]), 1e-2)
        self.assertLess(rel_err(updates["float16"], updates["float32"]), 2e-3)
        self.assertGreater(rel_err(updates["bfloat16"], updates["float32"]), 0)

    def test_wire_encoding_round_trips(self):
        x = self.grad(1000)
        for dtype, code, tol in (("float32", pb.DTYPE_FLOAT32, 0), ("float16", pb.DTYPE_FLOAT16, 1e-3),
                                 ("bfloat16", pb.DTYPE_BFLOAT16, 4e-3)):
            y = from_wire(to_wire(x, dtype), code, x.shape)
            self.assertLessEqual(float(np.max(np.abs(y - x) / np.maximum(np.abs(x), 1e-3))),
                                 tol, dtype)

    def test_an_update_of_many_chunks_is_received_into_one_buffer(self):
        # 3 MiB: three chunks each way at the server's default 1 MiB. One
        # receive buffer per tensor, not one of its whole size per chunk.
        import muon_client.client as client_module
        made = []

        class Counting(bytearray):
            def __init__(self, *args):
                if args and isinstance(args[0], int) and args[0] >= 768 * 1024 * 4:
                    made.append(args[0])  # a whole tensor's receive buffer
                super().__init__(*args)

        session = self.client.create_session([ParamSpec("w", (768, 1024), kind="adamw")],
                                             lr=1e-3)
        g = self.grad(768, 1024)
        client_module.bytearray = Counting
        try:
            result = session.step({0: g})
        finally:
            del client_module.bytearray
        self.assertEqual(len(made), 1)
        self.assertEqual(result.updates[0].shape, (768, 1024))
        self.assertTrue(np.isfinite(result.updates[0]).all())
        session.delete()

    def test_recycled_buffers_are_filled_again_and_give_the_same_steps(self):
        # A session handed its buffers back (recycle) receives and encodes the
        # next step into them instead of new ones; its steps are the steps of
        # a session that does not.
        specs = [ParamSpec("w", (48, 32)), ParamSpec("b", (300,), kind="adamw")]
        kept = self.client.create_session(specs, lr=0.02, adamw={"lr": 1e-3})
        fresh = self.client.create_session(specs, lr=0.02, adamw={"lr": 1e-3})
        received, sent = {}, {}
        for step in range(4):
            grads = {0: self.grad(48, 32), 1: self.grad(300)}
            wire = kept.encode(grads)
            result = kept.step_wire(wire)
            expected = fresh.step(grads)
            for i in (0, 1):
                np.testing.assert_array_equal(result.updates[i], expected.updates[i])
                self.assertEqual(result.decay[i], expected.decay[i])
                if step >= 1:
                    self.assertIs(result.buffers[i], received[i])
                if step >= 2:  # step 0's wire was bytes; its recycle kept a bytearray
                    self.assertIs(wire[i], sent[i])
            received, sent = dict(result.buffers), dict(wire)
            kept.recycle(result, wire)
        kept.delete()
        fresh.delete()

    def test_retry_after_dropped_stream_applies_once(self):
        shape = (512, 512)  # 1 MiB of fp32: the cut lands mid-gradient
        proxy = CuttingProxy(self.server.port)
        self.addCleanup(proxy.close)
        flaky = MuonClient(proxy.address)
        self.addCleanup(flaky.close)
        cut = flaky.create_session([ParamSpec("w", shape)])
        clean = self.client.create_session([ParamSpec("w", shape)])
        g1, g2 = self.grad(*shape), self.grad(*shape)
        step_cuts = 0
        for g in (g1, g2):
            proxy.cut_after(300_000)
            got = cut.step({0: g}, retries=5)
            want = clean.step({0: g})
            np.testing.assert_array_equal(got.updates[0], want.updates[0])
            self.assertEqual(proxy.cuts, step_cuts + 1)
            step_cuts = proxy.cuts
        self.assertEqual(self.client.get_session(cut.session_id, cut.token).step, 2)

    def test_replayed_step_returns_same_updates(self):
        session = self.client.create_session([ParamSpec("w", (32, 16))])
        g = self.grad(32, 16)
        first = session.step({0: g})
        # As if the summary had been lost: send step 1 again.
        replay = self.client._run_step(session, 1, {0: to_wire(g, "float32")}, lr=None,
                                       lr_scale=None, update_dtype=None,
                                       measure_orthogonality=False, retries=0)
        self.assertTrue(replay.summary.replayed)
        np.testing.assert_array_equal(replay.updates[0], first.updates[0])
        self.assertEqual(session.info().step, 1)

    def test_param_options_set_this_steps_hyper_parameters(self):
        shape = (24, 16)
        session = self.client.create_session(
            [ParamSpec("w", shape), ParamSpec("b", (16,))], lr=0.02, momentum=0.9,
            adamw={"lr": 1e-3})
        muon = MuonReference(shape, lr=0.02, momentum=0.9)
        adamw = AdamWReference((16,), lr=1e-3)
        for step, (m, nesterov, wd, b1, eps) in enumerate(
                ((0.9, True, 0.0, 0.9, 1e-8), (0.5, False, 0.1, 0.5, 1e-3),
                 (0.95, True, 0.2, 0.8, 1e-6))):
            gw, gb = self.grad(*shape), self.grad(16)
            muon.beta, muon.nesterov, muon.wd = m, nesterov, wd
            adamw.b1, adamw.eps, adamw.wd = b1, eps, wd
            result = session.step_wire(session.encode({0: gw, 1: gb}), param_options={
                0: dict(momentum=m, nesterov=nesterov, weight_decay=wd),
                1: dict(betas=(b1, 0.999), eps=eps, weight_decay=wd)})
            for i, (ref, g) in enumerate(((muon, gw), (adamw, gb))):
                decay, update = ref.step(g)
                self.assertLess(rel_err(result.updates[i], update), 1e-4, (step, self._seed))
                self.assertAlmostEqual(result.decay[i], decay, places=12)

    def test_bad_param_options_are_refused_and_change_nothing(self):
        session = self.client.create_session([ParamSpec("w", (8, 8)), ParamSpec("b", (8,))])
        g = session.encode({0: self.grad(8, 8), 1: self.grad(8)})
        cases = [
            ({0: dict(ns_steps=3)}, "fixed when the session is created"),
            ({0: dict(shape_scale="none")}, "fixed when the session is created"),
            ({2: dict(momentum=0.9)}, "names parameter 2"),
            ({0: dict(momentum=1.5)}, "momentum is 1.5"),
            ({1: dict(betas=(0.9, 1.0))}, "adam_beta2 is 1"),
            ({1: dict(eps=0.0)}, "adam_eps is 0"),
            ({0: dict(weight_decay=-1.0)}, "weight_decay is -1"),
            ({0: dict(lr=float("nan"))}, "lr is nan"),
        ]
        for options, message in cases:
            with self.subTest(message), self.assertRaises(MuonServerError) as ctx:
                session.step_wire(g, param_options=options, retries=0)
            self.assertEqual(ctx.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn(message, ctx.exception.details)
        self.assertEqual(session.info().step, 0)
        ps = self.client.create_session([ParamSpec("w", (8, 8))], mode="parameter_server")
        ps.push_weights({0: self.grad(8, 8)})
        with self.assertRaises(MuonServerError) as ctx:
            ps.step_wire(ps.encode({0: self.grad(8, 8)}), param_options={0: dict(momentum=0.5)},
                         update_content="weights", retries=0)
        self.assertIn("UPDATES sessions", ctx.exception.details)

    def test_errors_map_to_status_codes(self):
        session = self.client.create_session([ParamSpec("w", (8, 8))])
        cases = [
            (lambda: self.client.get_session("no-such-session"), grpc.StatusCode.NOT_FOUND),
            (lambda: session.step({0: np.full((8, 8), np.nan, np.float32)}),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: self.client._run_step(session, 1, {3: to_wire(self.grad(8, 8), "float32")},
                                           lr=None, lr_scale=None, update_dtype=None,
                                           measure_orthogonality=False, retries=0),
             grpc.StatusCode.NOT_FOUND),
            (lambda: self.client.create_session([ParamSpec("v", (8,), kind="muon")]),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for call, code in cases:
            with self.assertRaises(MuonServerError) as ctx:
                call()
            self.assertEqual(ctx.exception.code, code, str(ctx.exception))
            self.assertTrue(ctx.exception.details)
        session.step_number = 5  # ahead of the server
        with self.assertRaises(MuonServerError) as ctx:
            session.step({0: self.grad(8, 8)})
        self.assertEqual(ctx.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("expected step is 1", ctx.exception.details)
        with self.assertRaises(ValueError):
            session.step({3: self.grad(8, 8)})
        self.assertEqual(session.info().step, 0)


if __name__ == "__main__":
    unittest.main()
