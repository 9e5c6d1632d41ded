"""RemoteMuon when the server stalls, restarts or is not up yet, and when
the training process is interrupted."""
import _thread
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import grpc
import torch

from muon_client import MuonClient, MuonServerError, RemoteMuon
from server_fixture import CuttingProxy, ServerProcess, free_port


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def set_grads(model, seed):
    """Writes into existing .grad tensors, as backward() does after zero_grad()."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(torch.randn(p.shape, generator=g))


class Stopped:
    """SIGSTOP on a server for a block: it stops answering but its sockets stay open."""

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        self.server.process.send_signal(signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        self.server.process.send_signal(signal.SIGCONT)
        return False


INTERRUPTED_TRAINER = r"""
import sys, torch
from muon_client import RemoteMuon
model = torch.nn.Linear(8, 4)
opt = RemoteMuon(model.parameters(), server=sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
model(torch.randn(2, 8)).sum().backward()
print("stepping", flush=True)
opt.step()
print("step returned", flush=True)
"""


class ResilienceTest(unittest.TestCase):
    def setUp(self):
        self.seed = int(torch.seed() % (2 ** 31))

    def server(self, *flags, **kwargs):
        server = ServerProcess(*flags, **kwargs)
        self.addCleanup(server.stop)
        return server

    def remote(self, model, server, **kwargs):
        opt = RemoteMuon(model.parameters(), server=server, lr=0.05, **kwargs)
        self.addCleanup(opt.close, delete=False)
        return opt

    def test_a_stopped_server_is_an_error_in_bounded_time(self):
        server = self.server()
        cases = {
            # The keepalive finds the silent server (UNAVAILABLE) long before
            # the deadline (DEADLINE_EXCEEDED) would.
            "keepalive": (dict(keepalive_time=1.0, keepalive_timeout=1.0, retry_window=2.0,
                               step_timeout=60.0), grpc.StatusCode.UNAVAILABLE),
            # The keepalive would take its default 30 s: the deadline ends it.
            "deadline": (dict(step_timeout=1.0, retry_window=2.0),
                         grpc.StatusCode.DEADLINE_EXCEEDED),
        }
        for what, (timeouts, code) in cases.items():
            with self.subTest(what):
                model = make_model(self.seed)
                opt = self.remote(model, server.address, **timeouts)
                set_grads(model, 1)
                opt.step()
                with Stopped(server), self.assertRaises(MuonServerError) as ctx:
                    set_grads(model, 2)
                    opt.step()
                self.assertEqual(ctx.exception.code, code, ctx.exception.details)
                self.assertIn("retry window", ctx.exception.details)
                opt.step()  # the server is back: the same step completes
                self.assertEqual(opt.step_number, 2)

    def test_retries_span_a_server_restart_and_apply_once(self):
        checkpoints = tempfile.TemporaryDirectory()
        self.addCleanup(checkpoints.cleanup)
        flags = (f"--checkpoint_dir={checkpoints.name}", "--durability=strict")
        address = f"127.0.0.1:{free_port()}"
        restarted = []
        first = ServerProcess(*flags, listen=address)
        self.addCleanup(lambda: [s.stop() for s in [first] + restarted])
        control_server = self.server()
        model, control = make_model(self.seed), make_model(self.seed)
        opt = self.remote(model, address)
        control_opt = self.remote(control, control_server.address)
        for step in range(4):
            if step == 2:
                first.kill()

                def restart():
                    time.sleep(2)  # well past the 0.7 s the old retries covered
                    restarted.append(ServerProcess(*flags, listen=address))
                threading.Thread(target=restart, daemon=True).start()
            for m, o in ((model, opt), (control, control_opt)):
                set_grads(m, self.seed + step)
                o.step()
        self.assertEqual(len(restarted), 1)
        for p, q in zip(model.parameters(), control.parameters()):
            self.assertTrue(torch.equal(p, q), f"seed {self.seed}")
        self.assertEqual([s.info().step for s in opt.sessions], [4, 4])

    def test_construction_waits_for_a_server_that_is_starting(self):
        address = f"127.0.0.1:{free_port()}"
        with self.assertRaises(MuonServerError) as ctx:
            RemoteMuon(make_model(0).parameters(), server=address, connect_timeout=0.5)
        self.assertIn("not reachable", ctx.exception.details)
        built = []
        thread = threading.Thread(target=lambda: built.append(
            RemoteMuon(make_model(0).parameters(), server=address, connect_timeout=60)))
        thread.start()
        time.sleep(1)
        self.server(listen=address)
        thread.join(timeout=120)
        self.assertEqual(len(built), 1, "construction failed instead of waiting")
        self.addCleanup(built[0].close)
        self.assertEqual(len(built[0].sessions), 2)

    def test_ctrl_c_in_a_blocked_step_exits_promptly(self):
        server = self.server()
        process = subprocess.Popen([sys.executable, "-c", INTERRUPTED_TRAINER, server.address],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.assertEqual(process.stdout.readline().strip(), "ready")
        with Stopped(server):
            process.stdin.write("go\n")
            process.stdin.flush()
            self.assertEqual(process.stdout.readline().strip(), "stepping")
            time.sleep(0.5)  # inside step(), waiting on the stopped server
            process.send_signal(signal.SIGINT)
            try:
                # Without cancelling, a worker thread keeps the process alive
                # for the keepalive and the retry window (over 2 minutes).
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.fail("the process did not exit after Ctrl-C")
        self.assertNotEqual(process.returncode, 0)
        self.assertIn("KeyboardInterrupt", err, f"exit status {process.returncode}")

    def interrupted_run(self, hold_upstream):
        """Step 1 is interrupted while the proxy holds one direction; then
        step 2 runs with new gradients. Returns the model and the optimizer."""
        server = self.server()
        proxy = CuttingProxy(server.port)
        self.addCleanup(proxy.close)
        model = make_model(self.seed)
        opt = self.remote(model, proxy.address)
        direct = MuonClient(server.address)
        self.addCleanup(direct.close)
        set_grads(model, 1)
        proxy.hold(upstream=hold_upstream)

        def interrupt():
            if hold_upstream:
                time.sleep(0.5)  # the step cannot reach the server
            else:
                # The server committed; its answer is held back.
                while any(direct.get_session(s.session_id, s.token).step != 1
                          for s in opt.sessions):
                    time.sleep(0.02)
            _thread.interrupt_main()
        threading.Thread(target=interrupt, daemon=True).start()
        with self.assertRaises(KeyboardInterrupt):
            opt.step()
        self.assertEqual(opt.interrupted_step, 1)
        self.assertEqual(opt.step_number, 0)
        proxy.release()
        set_grads(model, 2)
        opt.step()
        self.assertIsNone(opt.interrupted_step)
        self.assertEqual([direct.get_session(s.session_id, s.token).step for s in opt.sessions],
                         [2, 2])
        return model, opt

    def control_run(self):
        server = self.server()
        model = make_model(self.seed)
        opt = self.remote(model, server.address)
        for seed in (1, 2):
            set_grads(model, seed)
            opt.step()
        return model

    def test_step_after_an_interrupt_completes_the_interrupted_step_first(self):
        control = self.control_run()
        for hold_upstream, what in ((False, "committed, answer lost"),
                                    (True, "never reached the server")):
            with self.subTest(what):
                model, opt = self.interrupted_run(hold_upstream)
                self.assertEqual(opt.step_number, 2)
                for p, q in zip(model.parameters(), control.parameters()):
                    self.assertTrue(torch.equal(p, q), f"seed {self.seed}")


if __name__ == "__main__":
    unittest.main()
