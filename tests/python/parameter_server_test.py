"""Parameter-server mode of RemoteMuon: three worker processes (ps_worker.py)
train one model on a real muon-server, and a worker killed mid-step and
restarted changes nothing."""
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import torch

from muon_client import MuonClient, ParamSpec, RemoteMuon
from ps_worker import ADAMW_LR, LR, SEED, WEIGHT_DECAY, backward, make_model, shard
from reference import rel_err
from server_fixture import ServerProcess

WORKERS = 3
STEPS = 20
# Worker 1 is killed after sending this step, while worker 2 is held back so
# the step cannot commit.
KILL_STEP = 6
# Largest relative error (Frobenius) of a parameter's final weights against
# the reference. Runs differ only by the order in which fp32 gradients are
# summed into the average (arrival order on the server, a fixed order in the
# reference): about 1e-7 per element per step, compounded over 20 steps;
# measured up to 4e-6. One worker's gradient counted twice in one step of the
# 20 gives 1.4e-2 (tried), and training moves every parameter by over 0.2.
TOLERANCE = 1e-4

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ps_worker.py")


def reference(server):
    """Feeds the average of the WORKERS shards' gradients to a one-worker
    parameter-server session; returns its final weights by name."""
    model = make_model(SEED)
    opt = RemoteMuon(model.named_parameters(), server=server, lr=LR, adamw_lr=ADAMW_LR,
                     weight_decay=WEIGHT_DECAY, mode="parameter_server", workers=1)
    shards = [shard(w, WORKERS) for w in range(WORKERS)]
    for _ in range(STEPS):
        grads = []
        for x, y in shards:
            backward(model, x, y)
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, gs in zip(model.parameters(), zip(*grads)):
            p.grad = sum(gs) / WORKERS
        opt.step()
    opt.delete_sessions()
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


class Run:
    """Worker processes sharing one session, files in a temporary directory."""

    def __init__(self, server):
        self.server = server
        self._dir = tempfile.TemporaryDirectory()
        self.session_file = os.path.join(self._dir.name, "session")
        self.wait_file = os.path.join(self._dir.name, "go")
        self._processes = []

    def out(self, worker):
        return os.path.join(self._dir.name, f"worker{worker}.pt")

    def start(self, worker, *extra):
        process = subprocess.Popen(
            [sys.executable, WORKER_SCRIPT, f"--server={self.server}", f"--worker={worker}",
             f"--workers={WORKERS}", f"--steps={STEPS}", f"--session_file={self.session_file}",
             f"--out={self.out(worker)}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._processes.append(process)
        return process

    def start_first(self):
        """Worker 0, once it has created the session."""
        process = self.start(0)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.session_file):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError("worker 0 made no session: " + process.communicate()[1])
            time.sleep(0.05)
        return process

    def session(self):
        with open(self.session_file) as f:
            session_id, token = f.read().split()
        client = MuonClient(self.server)
        # In the session's order (RemoteMuon puts matrices first).
        params = [ParamSpec(p.name, tuple(p.shape))
                  for p in client.get_session(session_id, token).params]
        return client.attach(session_id, token, params)

    def finish(self, test, processes):
        for worker, process in processes.items():
            out, err = process.communicate(timeout=300)
            test.assertEqual(process.returncode, 0, f"worker {worker}:\n{out}\n{err}")
        session = self.session()
        step, weights = session.pull_weights()
        test.assertEqual(step, STEPS)
        final = {session.params[i].name: w for i, w in weights.items()}
        # Every worker ends with the server's weights, bit for bit.
        for worker in processes:
            saved = torch.load(self.out(worker))
            for name, w in final.items():
                test.assertTrue(np.array_equal(saved[name].numpy(), w),
                                f"worker {worker} parameter {name}")
        return final

    def close(self):
        # A failed test leaves workers waiting for the others (or the wait file).
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
        self._dir.cleanup()


class ParameterServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess()
        cls.reference = reference(cls.server.address)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def new_run(self):
        run = Run(self.server.address)
        self.addCleanup(run.close)
        return run

    def assert_close(self, got, want, what):
        initial = {n: p.detach().numpy() for n, p in make_model(SEED).named_parameters()}
        for name, w in want.items():
            err = rel_err(got[name], w)
            print(f"{what}: {name} relative error {err:.2e} "
                  f"(moved {rel_err(initial[name], w):.2e} from the initial weights)")
            self.assertLess(err, TOLERANCE, f"{what}: parameter {name}")

    def uninterrupted(self):
        run = self.new_run()
        processes = {0: run.start_first()}
        for worker in range(1, WORKERS):
            processes[worker] = run.start(worker)
        return run.finish(self, processes)

    def test_bad_arguments_raise_before_any_call(self):
        model = make_model(SEED)
        ps = dict(server=self.server.address, mode="parameter_server", workers=WORKERS)
        cases = [
            (dict(ps, server=[self.server.address] * 2), "one server"),
            (dict(ps, worker=WORKERS), "is not in"),
            (dict(ps, worker=1), "needs the session_id and token"),
            (dict(ps, session_id="s"), "both session_id and token"),
            (dict(server=self.server.address, worker=1, workers=2), "are for mode"),
            (dict(ps, mode="allreduce"), "unknown mode"),
        ]
        for kwargs, message in cases:
            with self.subTest(message):
                with self.assertRaisesRegex(ValueError, message):
                    RemoteMuon(model.parameters(), **kwargs)

    def test_attach_checks_the_number_of_workers(self):
        model = make_model(SEED)
        first = RemoteMuon(model.parameters(), server=self.server.address,
                           mode="parameter_server", workers=2)
        self.addCleanup(first.delete_sessions)
        with self.assertRaisesRegex(ValueError, "not a parameter-server session of 3 workers"):
            RemoteMuon(make_model(SEED).parameters(), server=self.server.address,
                       mode="parameter_server", worker=1, workers=3,
                       session_id=first.session_id, token=first.token)

    def test_parameter_without_grad_sends_zeros(self):
        model = make_model(SEED)
        opt = RemoteMuon(model.named_parameters(), server=self.server.address,
                         mode="parameter_server")
        self.addCleanup(opt.delete_sessions)
        backward(model, *shard(0, 1))
        model[4].bias.grad = None
        opt.step()
        self.assertEqual(len(opt.last_summary.param_indices), len(list(model.parameters())))

    def test_client_update_content_update_matches_the_pulled_weights(self):
        client = MuonClient(self.server.address)
        session = client.create_session([ParamSpec("w", (8, 4)), ParamSpec("b", (4,))],
                                        mode="parameter_server", num_workers=1)
        self.addCleanup(session.delete)
        rng = np.random.default_rng(0)
        weights = {0: rng.standard_normal((8, 4), dtype=np.float32),
                   1: rng.standard_normal(4, dtype=np.float32)}
        self.assertEqual(session.push_weights(weights), 0)
        result = session.step({0: rng.standard_normal((8, 4)), 1: rng.standard_normal(4)},
                              update_content="update")
        self.assertEqual(result.weights, {})
        step, pulled = session.pull_weights()
        self.assertEqual(step, 1)
        for i, w in weights.items():
            np.testing.assert_allclose(pulled[i], result.decay[i] * w + result.updates[i],
                                       rtol=0, atol=1e-6)
            self.assertFalse(np.array_equal(pulled[i], w))

    def test_three_worker_processes_equal_one_worker_fed_the_average(self):
        self.assert_close(self.uninterrupted(), self.reference, "3 workers vs reference")

    def test_worker_killed_mid_step_and_restarted_changes_nothing(self):
        run = self.new_run()
        processes = {0: run.start_first(), 1: run.start(1),
                     2: run.start(2, f"--wait_file={run.wait_file}", f"--wait_step={KILL_STEP}")}
        victim = processes[1]
        for line in victim.stdout:
            if line.strip() == f"sending step {KILL_STEP}":
                break
        else:
            self.fail("worker 1 ended early: " + victim.communicate()[1])
        time.sleep(1)  # its gradients reach the server; the step waits for worker 2
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
        step, _ = run.session().pull_weights()
        self.assertEqual(step, KILL_STEP - 1, "the step must still be in flight")

        restarted = processes[1] = run.start(1)
        self.assertEqual(restarted.stdout.readline().strip(), f"attached at step {KILL_STEP - 1}")
        open(run.wait_file, "w").close()
        killed = run.finish(self, processes)
        self.assert_close(killed, self.uninterrupted(), "killed vs uninterrupted")
        self.assert_close(killed, self.reference, "killed vs reference")


if __name__ == "__main__":
    unittest.main()
