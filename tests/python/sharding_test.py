"""RemoteMuon sharded over several muon-server processes by rendezvous hashing."""
import unittest

import torch

from muon_client import MuonServerError, RemoteMuon
from muon_client.client import place
from server_fixture import ServerProcess


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 4))


class ShardingTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.servers = [ServerProcess() for _ in range(3)]

    @classmethod
    def tearDownClass(cls):
        for s in cls.servers:
            s.stop()

    def train(self, servers, seed, steps=5):
        model = make_model(seed)
        opt = RemoteMuon(model.named_parameters(), server=servers, lr=0.05, adamw_lr=1e-3,
                         weight_decay=0.01)
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model, opt

    def test_sharded_run_equals_single_server_run(self):
        seed = int(torch.seed() % (2 ** 31))
        addresses = [s.address for s in self.servers]
        sharded, opt = self.train(addresses, seed)
        single, _ = self.train(addresses[:1], seed)
        used = [len(s.info().params) for s in opt.sessions]
        self.assertEqual(sum(used), 6)
        self.assertGreaterEqual(len(used), 2, used)  # really spread
        for a, b in zip(sharded.parameters(), single.parameters()):
            self.assertTrue(torch.equal(a, b), f"seed {seed}")
        for session in opt.sessions:
            self.assertEqual(session.info().step, 5)

    def test_servers_without_parameters_get_no_session(self):
        model = torch.nn.Linear(8, 4, bias=False)  # one parameter, three servers
        opt = RemoteMuon(model.named_parameters(), server=[s.address for s in self.servers])
        self.assertEqual(len(opt.sessions), 1)
        before = model.weight.detach().clone()
        opt.zero_grad()
        model(torch.randn(3, 8)).sum().backward()
        opt.step()
        self.assertFalse(torch.equal(model.weight, before))
        state = opt.state_dict()
        resumed = RemoteMuon(model.named_parameters(), server=[s.address for s in self.servers])
        resumed.load_state_dict(state)
        self.assertEqual(resumed.step_number, 1)
        self.assertEqual(len(resumed.sessions), 1)

    def test_adding_a_server_moves_only_parameters_to_it(self):
        names = [f"layer{i}.weight" for i in range(200)]
        three = ["s0:1", "s1:1", "s2:1"]
        four = three + ["s3:1"]
        moved = 0
        for name in names:
            before, after = place(three, name), place(four, name)
            if before != after:
                self.assertEqual(after, 3, name)
                moved += 1
        # About a quarter move; bounds far from what a bad hash would give.
        self.assertGreater(moved, 20)
        self.assertLess(moved, 90)

    def test_failed_shard_changes_no_weight_and_retry_completes(self):
        addresses = [s.address for s in self.servers]
        model = make_model(1)
        opt = RemoteMuon(model.named_parameters(), server=addresses)
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        bad = model[4].bias  # a NaN in one shard's gradient fails that shard only
        saved = bad.grad.clone()
        bad.grad[0] = float("nan")
        with self.assertRaises(MuonServerError):
            opt.step()
        for p, b in zip(model.parameters(), before):
            self.assertTrue(torch.equal(p, b))
        bad.grad.copy_(saved)
        opt.step()  # shards that committed replay; the failed one applies now
        self.assertTrue(all(s.info().step == 1 for s in opt.sessions))
        self.assertFalse(all(torch.equal(p, b) for p, b in zip(model.parameters(), before)))


if __name__ == "__main__":
    unittest.main()
