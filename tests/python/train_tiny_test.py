"""examples/train_tiny.py --check: RemoteMuon trains like a local Muon."""
import os
import subprocess
import sys
import unittest

from server_fixture import ServerProcess


class TrainTinyTest(unittest.TestCase):
    def test_check_passes(self):
        server = ServerProcess()
        self.addCleanup(server.stop)
        out = subprocess.run(
            [sys.executable, os.path.join(os.environ["MUON_EXAMPLES"], "train_tiny.py"),
             f"--server={server.address}", "--steps=60", "--check"],
            capture_output=True, text=True, timeout=300)
        print(out.stdout[-2000:], out.stderr[-2000:])
        self.assertEqual(out.returncode, 0)
        last = out.stdout.strip().splitlines()[-1]
        self.assertTrue(last.startswith("final loss remote"), last)
        self.assertTrue(last.endswith("OK"), last)


if __name__ == "__main__":
    unittest.main()
