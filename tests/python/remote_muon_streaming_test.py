"""RemoteMuon streams gradients during backward (docs/python.md, "Gradients
stream during backward"): the streamed step equals the step sent whole, bit
for bit, through gradient accumulation, clipping, a skipped step and a
server that dies mid-stream; and the vectorised bf16 encoder equals the
reference one."""
import _thread
import contextlib
import tempfile
import threading
import time
import unittest

import grpc
import numpy as np
import torch

from muon_client import RemoteMuon
from muon_client import client as client_module
from muon_client.client import MuonClient, ParamSpec, pb
from server_fixture import CuttingProxy, ServerProcess, free_port


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 16, generator=g), torch.randn(12, 8, generator=g)


def loss_of(model, seed):
    x, y = batch(seed)
    return ((model(x) - y) ** 2).mean()


def reference_bf16(a):
    """The encoder before vectorisation, kept as the reference."""
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


class StreamingTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        self.seed = int(torch.seed() % (2 ** 31))

    def pair(self, address=None, streaming=True, **kwargs):
        """Two equal models, one with streaming on (or `streaming`) and one with it off."""
        out = []
        for streaming in (streaming, False):
            model = make_model(self.seed)
            opt = RemoteMuon(model.parameters(), server=address or self.server.address, lr=0.05,
                             adamw_lr=0.01, stream_gradients=streaming, **kwargs)
            self.addCleanup(opt.close)
            out.append((model, opt))
        return out

    def assertSameWeights(self, a, b):
        for p, q in zip(a.parameters(), b.parameters()):
            self.assertTrue(torch.equal(p, q), f"seed {self.seed}")

    def test_streamed_steps_equal_whole_steps_bit_for_bit(self):
        (model, opt), (control, control_opt) = self.pair()
        for step in range(4):
            for m, o in ((model, opt), (control, control_opt)):
                o.zero_grad()
                loss_of(m, self.seed + step).backward()
                if o is opt:
                    # Sent during backward: the streams are open before step().
                    self.assertEqual(len(opt._streams), len(opt.sessions))
                o.step()
            self.assertTrue(opt.last_step_streamed)
            self.assertFalse(control_opt.last_step_streamed)
        self.assertSameWeights(model, control)
        self.assertEqual([s.info().step for s in opt.sessions], [4, 4])

    def test_streamed_training_matches_local_muon(self):
        # A Muon/AdamW step in float64 from docs/math.md, applied to a copy.
        from reference import AdamWReference, MuonReference
        model = make_model(self.seed)
        local = make_model(self.seed)
        opt = RemoteMuon(model.parameters(), server=self.server.address, lr=0.05, momentum=0.9,
                         weight_decay=0.0, adamw_lr=0.01, adamw_betas=(0.9, 0.95),
                         adamw_eps=1e-10)
        self.addCleanup(opt.close)
        refs = [MuonReference(tuple(p.shape), lr=0.05, momentum=0.9) if p.ndim == 2
                else AdamWReference(tuple(p.shape), lr=0.01, betas=(0.9, 0.95), eps=1e-10)
                for p in local.parameters()]
        for step in range(5):
            opt.zero_grad()
            local.zero_grad()
            remote_loss = loss_of(model, self.seed + step)
            local_loss = loss_of(local, self.seed + step)
            self.assertAlmostEqual(remote_loss.item(), local_loss.item(), delta=1e-3)
            remote_loss.backward()
            local_loss.backward()
            opt.step()
            self.assertTrue(opt.last_step_streamed)
            with torch.no_grad():
                for p, ref in zip(local.parameters(), refs):
                    decay, update = ref.step(p.grad.numpy())
                    p.copy_(torch.from_numpy(decay * p.numpy() + update).float())

    def test_transfer_only_streams_defer_the_compute_and_equal_whole_steps(self):
        (model, opt), (control, control_opt) = self.pair(streaming="transfer")
        for step in range(3):
            for m, o in ((model, opt), (control, control_opt)):
                o.zero_grad()
                loss_of(m, self.seed + step).backward()
                if o is opt:
                    self.assertTrue(all(s.stream.defer_compute for s in opt._streams.values()))
                    self.assertEqual(len(opt._streams), len(opt.sessions))
                o.step()
            self.assertTrue(opt.last_step_streamed)
        self.assertSameWeights(model, control)
        with self.assertRaises(ValueError):
            RemoteMuon(make_model(0).parameters(), server=self.server.address,
                       stream_gradients="later")

    def test_gradient_accumulation_sends_only_the_final_micro_batch(self):
        for micros, marked in ((2, False), (4, False), (2, True), (4, True)):
            with self.subTest(micro_batches=micros, final_backward=marked):
                (model, opt), (control, control_opt) = self.pair()
                for step in range(3):
                    for m, o in ((model, opt), (control, control_opt)):
                        o.zero_grad()
                        for micro in range(micros):
                            final = marked and micro == micros - 1
                            with o.final_backward() if final else contextlib.nullcontext():
                                (loss_of(m, 100 * step + micro) / micros).backward()
                            if o is opt and step > 0:
                                # Nothing is sent before the final micro-batch.
                                self.assertEqual(bool(opt._streams), final)
                        o.step()
                    # Unmarked: the second micro-batch cancels the stream, and
                    # from then on nothing streams outside final_backward().
                    self.assertEqual(opt.last_step_streamed, marked)
                self.assertSameWeights(model, control)
                self.assertEqual(opt.sessions[0].info().step, 3)

    def test_clip_grad_norm_keeps_streaming_and_equals_the_in_place_clip(self):
        (model, opt), (control, control_opt) = self.pair()
        for step in range(3):
            for m, o in ((model, opt), (control, control_opt)):
                o.zero_grad()
                (10 * loss_of(m, self.seed + step)).backward()
                if o is opt:
                    norm = opt.clip_grad_norm_(0.5)
                else:
                    control_norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
                o.step()
            self.assertTrue(torch.equal(norm, control_norm))
            self.assertGreater(norm.item(), 0.5)  # the clip is active
            # The first clip cancels a stream opened without deferred compute.
            self.assertEqual(opt.last_step_streamed, step > 0)
        self.assertSameWeights(model, control)
        for p, q in zip(model.parameters(), control.parameters()):
            self.assertTrue(torch.equal(p.grad, q.grad))  # clipped in place, as torch does

    def test_torch_clip_after_streaming_falls_back_to_the_whole_step(self):
        (model, opt), (control, control_opt) = self.pair()
        for step in range(3):
            for m, o in ((model, opt), (control, control_opt)):
                o.zero_grad()
                (10 * loss_of(m, self.seed + step)).backward()
                if o is opt:
                    # Two stale steps in a row turn streaming off.
                    self.assertEqual(bool(opt._streams), step < 2)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
                o.step()
            self.assertFalse(opt.last_step_streamed)
        self.assertSameWeights(model, control)

    def test_an_in_place_unscale_after_streaming_falls_back(self):
        (model, opt), (control, control_opt) = self.pair()
        for m, o in ((model, opt), (control, control_opt)):
            o.zero_grad()
            (1024 * loss_of(m, self.seed)).backward()
            for p in m.parameters():
                p.grad.mul_(1 / 1024)  # what GradScaler.unscale_ does
            o.step()
        self.assertFalse(opt.last_step_streamed)
        self.assertSameWeights(model, control)

    def test_an_lr_changed_after_backward_falls_back_with_the_new_lr(self):
        (model, opt), (control, control_opt) = self.pair()
        for m, o in ((model, opt), (control, control_opt)):
            o.zero_grad()
            loss_of(m, self.seed).backward()
            for group in o.param_groups:
                group["lr"] *= 0.5  # a schedule stepped between backward and step()
            o.step()
        self.assertFalse(opt.last_step_streamed)
        self.assertSameWeights(model, control)

    def test_a_skipped_step_is_not_committed(self):
        for set_to_none in (False, True):
            with self.subTest(set_to_none=set_to_none):
                (model, opt), (control, control_opt) = self.pair()
                # GradScaler found inf: backward ran, step() was not called.
                loss_of(model, self.seed).backward()
                self.assertTrue(opt._streams)
                opt.zero_grad(set_to_none=set_to_none)
                for m, o in ((model, opt), (control, control_opt)):
                    o.zero_grad(set_to_none=set_to_none)
                    loss_of(m, self.seed + 1).backward()
                    o.step()
                self.assertTrue(opt.last_step_streamed)
                self.assertEqual(opt.step_number, 1)
                self.assertEqual([s.info().step for s in opt.sessions], [1, 1])
                self.assertSameWeights(model, control)

    def test_a_server_killed_mid_stream_is_retried_and_applied_once(self):
        checkpoints = tempfile.TemporaryDirectory()
        self.addCleanup(checkpoints.cleanup)
        flags = (f"--checkpoint_dir={checkpoints.name}", "--durability=strict")
        address = f"127.0.0.1:{free_port()}"
        servers = [ServerProcess(*flags, listen=address)]
        self.addCleanup(lambda: [s.stop() for s in servers])
        (model, opt), (control, control_opt) = self.pair(address=address)
        for step in range(4):
            for m, o in ((model, opt), (control, control_opt)):
                o.zero_grad()
                loss_of(m, self.seed + step).backward()
                if o is opt and step == 2:
                    self.assertTrue(opt._streams)  # sent, StepEnd not yet
                    servers[0].kill()

                    def restart():
                        time.sleep(1)
                        servers.append(ServerProcess(*flags, listen=address))
                    threading.Thread(target=restart, daemon=True).start()
                o.step()
        self.assertEqual(len(servers), 2)
        self.assertSameWeights(model, control)
        self.assertEqual([s.info().step for s in opt.sessions], [4, 4])

    def test_an_interrupted_streamed_step_completes_with_its_own_gradients(self):
        for hold_upstream, what in ((False, "committed, answer lost"),
                                    (True, "never reached the server")):
            with self.subTest(what):
                proxy = CuttingProxy(self.server.port)
                self.addCleanup(proxy.close)
                (model, opt), (control, control_opt) = self.pair(address=proxy.address)
                direct = MuonClient(self.server.address)
                self.addCleanup(direct.close)
                proxy.hold(upstream=hold_upstream)
                loss_of(model, 1).backward()

                def interrupt():
                    if hold_upstream:
                        time.sleep(0.5)
                    else:
                        while any(direct.get_session(s.session_id, s.token).step != 1
                                  for s in opt.sessions):
                            time.sleep(0.02)
                    _thread.interrupt_main()
                threading.Thread(target=interrupt, daemon=True).start()
                with self.assertRaises(KeyboardInterrupt):
                    opt.step()
                self.assertEqual(opt.interrupted_step, 1)
                proxy.release()
                # New gradients (at the weights before step 1, which is not
                # applied yet); the next step() completes step 1 with step 1's.
                opt.zero_grad()
                loss_of(model, 2).backward()
                opt.step()
                grads = []
                for seed in (1, 2):
                    control.zero_grad()
                    loss_of(control, seed).backward()
                    grads.append([p.grad.clone() for p in control.parameters()])
                for step_grads in grads:
                    for p, g in zip(control.parameters(), step_grads):
                        p.grad = g
                    control_opt.step()
                self.assertEqual(opt.step_number, 2)
                self.assertSameWeights(model, control)

    def test_close_cancels_open_streams(self):
        model = make_model(self.seed)
        opt = RemoteMuon(model.parameters(), server=self.server.address)
        loss_of(model, self.seed).backward()
        streams = [s.stream for s in opt._streams.values()]
        self.assertTrue(streams)
        opt.close()
        self.assertFalse(opt._streams)
        for stream in streams:
            with self.assertRaises(grpc.RpcError) as ctx:
                list(stream.call)
            self.assertEqual(ctx.exception.code(), grpc.StatusCode.CANCELLED)

    def test_streaming_off_sends_after_backward(self):
        model = make_model(self.seed)
        opt = RemoteMuon(model.parameters(), server=self.server.address, stream_gradients=False)
        self.addCleanup(opt.close)
        loss_of(model, self.seed).backward()
        self.assertFalse(opt._streams)
        opt.step()
        self.assertFalse(opt.last_step_streamed)


class GradScaleProtocolTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess()
        cls.client = MuonClient(cls.server.address)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def session(self, **kwargs):
        session = self.client.create_session([ParamSpec("w", (8, 4)), ParamSpec("b", (4,))],
                                             lr=0.02, **kwargs)
        self.addCleanup(session.delete)
        return session

    def grads(self):
        rng = np.random.default_rng(7)
        return {0: rng.standard_normal((8, 4), dtype=np.float32),
                1: rng.standard_normal(4, dtype=np.float32)}

    def raw_step(self, session, header, grad_scale):
        """One attempt as sent, past the client's own checks."""
        return self.client._step_once(session, 1, session.encode(self.grads()),
                                      dict(header, worker_id=0), client_module.CancelToken(),
                                      grad_scale)

    def test_a_bad_factor_is_refused_and_nothing_applied(self):
        session = self.session()
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with self.subTest(bad=bad), self.assertRaises(grpc.RpcError) as ctx:
                self.raw_step(session, {"defer_compute": True}, bad)
            self.assertEqual(ctx.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("finite and > 0", ctx.exception.details())
            with self.assertRaises(ValueError):  # the client checks it first
                session.step_wire(session.encode(self.grads()), grad_scale=bad)
        self.assertEqual(session.info().step, 0)
        session.step(self.grads())
        self.assertEqual(session.info().step, 1)

    def test_a_factor_needs_deferred_compute(self):
        session = self.session()
        with self.assertRaises(grpc.RpcError) as ctx:
            self.raw_step(session, {}, 0.5)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("defer_compute", ctx.exception.details())
        self.assertEqual(session.info().step, 0)

    def test_the_factor_scales_the_gradients(self):
        scaled, plain = self.session(), self.session()
        grads = self.grads()
        a = scaled.step_wire(scaled.encode(grads), grad_scale=0.25)
        b = plain.step({i: (g * np.float32(0.25)).astype(np.float32) for i, g in grads.items()})
        for i in a.updates:
            np.testing.assert_array_equal(a.updates[i], b.updates[i])

    def test_parameter_server_sessions_refuse_deferred_compute(self):
        session = self.session(mode="parameter_server", num_workers=1)
        session.push_weights({0: np.zeros((8, 4), np.float32), 1: np.zeros(4, np.float32)})
        with self.assertRaises(grpc.RpcError) as ctx:
            self.raw_step(session, {"defer_compute": True}, None)
        self.assertEqual(ctx.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("UPDATES sessions", ctx.exception.details())


class ChunkSerializationTest(unittest.TestCase):
    def test_a_chunk_serialized_from_a_view_parses_as_the_message(self):
        data = np.random.default_rng().standard_normal(70000).astype(np.float32).tobytes()
        for index, offset, dtype, size in ((0, 0, pb.DTYPE_FLOAT32, 4), (3, 1 << 33, 0, 200),
                                           (70000, 12, pb.DTYPE_BFLOAT16, len(data))):
            view = memoryview(data)[:size]
            got = pb.StepRequest.FromString(client_module._chunk_request(index, offset, dtype,
                                                                          view))
            want = pb.StepRequest(gradient=pb.TensorChunk(param_index=index, offset=offset,
                                                          dtype=dtype, data=data[:size]))
            self.assertEqual(got, want)


class Bf16EncoderTest(unittest.TestCase):
    def test_vectorised_encoders_equal_the_reference_bit_for_bit(self):
        rng = np.random.default_rng()
        random = rng.standard_normal(1 << 16).astype(np.float32) * np.float32(1e3)
        # Ties at every even/odd lsb, NaNs of both signs and payloads,
        # infinities, the largest finite value (rounds to inf), subnormals.
        specials = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7FC00000,
                             0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000,
                             0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80008000, 0x00018000, 0,
                             0x80000000], dtype=np.uint32).view(np.float32)
        ties = (rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
        data = np.concatenate([random, specials, ties])
        expected = reference_bf16(data)
        with_torch = client_module._bfloat16_bits(data)
        saved, client_module._torch = client_module._torch, None
        try:
            with_numpy = client_module._bfloat16_bits(data)
        finally:
            client_module._torch = saved
        np.testing.assert_array_equal(with_torch, expected)
        np.testing.assert_array_equal(with_numpy, expected)
        self.assertEqual(client_module.to_wire(data, "bfloat16"), expected.astype("<u2").tobytes())


if __name__ == "__main__":
    unittest.main()
