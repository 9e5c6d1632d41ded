"""buf lint on proto/ with the repository's buf.yaml (MUON_BUF: the buf binary
from the npm package @bufbuild/buf, tests/deploy/npm), and on a copy with a
badly named enum added, which must fail: the excepted rules (buf.yaml says
why) are excepted for their files only."""
import os
import shutil
import subprocess
import tempfile
import unittest

ROOT = os.environ["MUON_SOURCE"]


def buf_lint(root):
    return subprocess.run([os.environ["MUON_BUF"], "lint"], cwd=root, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, BUF_CACHE_DIR=os.environ["MUON_BUF_CACHE"]))


class BufLintTest(unittest.TestCase):
    def test_proto_passes_buf_lint(self):
        out = buf_lint(ROOT)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_a_new_violation_fails(self):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(os.path.join(ROOT, "proto"), os.path.join(tmp, "proto"),
                            ignore=shutil.ignore_patterns("CMakeLists.txt"))
            shutil.copy(os.path.join(ROOT, "buf.yaml"), tmp)
            v1 = os.path.join(tmp, "proto", "muon", "v1")
            # In optimizer.proto ENUM_VALUE_PREFIX is excepted, the other rules are not.
            with open(os.path.join(v1, "optimizer.proto"), "a") as f:
                f.write("\nenum Color {\n  RED = 0;\n}\n")
            # Elsewhere nothing is excepted.
            with open(os.path.join(v1, "shape.proto"), "w") as f:
                f.write('syntax = "proto3";\npackage muon.v1;\noption go_package = "muon/v1;muonv1";\n'
                        "enum Shape {\n  SHAPE_UNSPECIFIED = 0;\n  ROUND = 1;\n}\n")
            out = buf_lint(tmp)
            self.assertNotEqual(out.returncode, 0, out.stdout)
            self.assertIn('optimizer.proto:', out.stdout)
            self.assertIn('Enum zero value name "RED" should be suffixed with "_UNSPECIFIED"',
                          out.stdout)
            self.assertIn('shape.proto:6:3:Enum value name "ROUND" should be prefixed with "SHAPE_"',
                          out.stdout)


if __name__ == "__main__":
    unittest.main()
