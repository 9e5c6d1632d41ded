"""deploy/Dockerfile, read: its runtime stage installs the Debian packages
owning every library the built binaries load, and its user, ports, volume and
health check agree with the Helm chart. image_test.py builds and runs it.

MUON_BINARIES (colon-separated paths of the built muon-server and muonctl)
enables the library check; without it only the static checks run.
"""
import os
import re
import shlex
import subprocess
import unittest

import yaml

DEPLOY = os.environ["MUON_DEPLOY"]
CHART = os.path.join(DEPLOY, "helm", "muon-server")
# In debian:12-slim already (Essential packages and apt's own dependencies).
BASE_IMAGE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}


def stages():
    """The Dockerfile's stages as lists of instructions (continuations joined)."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def instructions(stage, keyword):
    return [line[len(keyword):].strip() for line in stage if line.upper().startswith(keyword + " ")]


def needed_packages(binary):
    """{soname: Debian package, or the resolved path when no package owns it}."""
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]",
                        subprocess.run(["readelf", "-d", binary], capture_output=True, text=True,
                                       check=True).stdout)
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    resolved = dict(re.findall(r"^\s*(\S+) => (/\S+)", ldd, re.M))
    # The dynamic loader is listed by path only ("/lib64/ld-linux-x86-64.so.2 (0x...)").
    for path in re.findall(r"^\s*(/\S+) \(", ldd, re.M):
        resolved.setdefault(os.path.basename(path), path)
    candidates = {}
    for soname in needed:
        path = resolved[soname]
        paths = {path, os.path.realpath(path)}
        candidates[soname] = paths | {p.replace("/usr/lib/", "/lib/", 1) for p in paths}
    # One dpkg query for all (it reads its whole database each time).
    owners = {}
    query = subprocess.run(["dpkg", "-S", *set().union(*candidates.values())],
                           capture_output=True, text=True)
    for line in query.stdout.splitlines():
        package, _, path = line.partition(": ")
        owners[path] = package.split(":")[0]
    out = {}
    for soname, paths in candidates.items():
        owned = [owners[p] for p in sorted(paths) if p in owners]
        out[soname] = owned[0] if owned else os.path.realpath(resolved[soname])
    return out


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stages = stages()
        cls.runtime = cls.stages[-1]
        with open(os.path.join(CHART, "values.yaml")) as f:
            cls.values = yaml.safe_load(f)

    def test_stages_and_the_build_runs_scripts_setup(self):
        self.assertEqual([s[0] for s in self.stages], ["FROM ${DEBIAN_IMAGE} AS build",
                                                       "FROM ${DEBIAN_SLIM_IMAGE} AS runtime"])
        self.assertTrue(any("/tmp/setup" in r for r in instructions(self.stages[0], "RUN")))
        self.assertIn("COPY scripts/setup /tmp/setup", self.stages[0])
        # image_test.py swaps the build stage for prebuilt binaries: the
        # runtime stage takes nothing else from it.
        self.assertEqual(sorted(c.split()[0] for c in instructions(self.runtime, "COPY")),
                         ["--from=build", "--from=build", "deploy/muon-healthcheck"])

    def test_runtime_entrypoint_user_ports_volume_health(self):
        (entrypoint,) = instructions(self.runtime, "ENTRYPOINT")
        self.assertEqual(yaml.safe_load(entrypoint), ["muon-server"])
        (user,) = instructions(self.runtime, "USER")
        self.assertNotIn(user.split(":")[0], ("0", "root"))
        self.assertEqual(user.split(":")[0], "10001")  # the chart's runAsUser
        (expose,) = instructions(self.runtime, "EXPOSE")
        ports = self.values["ports"]
        self.assertEqual(expose.split(), [str(ports["grpc"]), str(ports["metrics"])])
        (volume,) = instructions(self.runtime, "VOLUME")
        self.assertEqual(volume, self.values["persistence"]["mountPath"])
        env = " ".join(instructions(self.runtime, "ENV"))
        self.assertIn(f"MUON_LISTEN=0.0.0.0:{ports['grpc']}", env)
        self.assertIn(f"MUON_METRICS_LISTEN=0.0.0.0:{ports['metrics']}", env)
        self.assertIn(f"MUON_CHECKPOINT_DIR={volume}", env)
        (health,) = instructions(self.runtime, "HEALTHCHECK")
        command = yaml.safe_load(health.split("CMD", 1)[1])
        # The script finds the listen address (image_test.py runs it).
        self.assertEqual(command, ["muon-healthcheck"])
        self.assertIn("deploy/muon-healthcheck /usr/local/bin/", instructions(self.runtime, "COPY"))

    @unittest.skipUnless(os.environ.get("MUON_BINARIES"), "MUON_BINARIES not set")
    def test_runtime_installs_every_library_the_binaries_load(self):
        words = set(shlex.split(" ".join(instructions(self.runtime, "RUN")).replace(";", " ")))
        copies = " ".join(instructions(self.runtime, "COPY"))
        for binary in os.environ["MUON_BINARIES"].split(":"):
            for soname, owner in needed_packages(binary).items():
                with self.subTest(binary=os.path.basename(binary), library=soname):
                    if soname.startswith("libprometheus-cpp-"):
                        # Not in Debian 12: copied from the build stage.
                        self.assertIn(soname.split(".so")[0] + ".so", copies)
                    elif soname.startswith(("libcublas", "libcudart")):
                        self.assertIn("libcublas-${CUDA_PKG}", words)
                    elif owner.startswith("/"):
                        self.fail(f"{soname} ({owner}) belongs to no Debian package")
                    elif owner not in BASE_IMAGE_PACKAGES:
                        self.assertTrue(owner in words, f"{soname} needs Debian package {owner}")


if __name__ == "__main__":
    unittest.main()
