#!/usr/bin/env python3
"""deploy/Dockerfile, built and run with podman on loopback.

The base image is a Debian 12 root filesystem made by mmdebstrap from the
apt sources this machine already has, imported into podman (it stands in for
debian:12-slim, which no registry here serves). The image under test is
either MUON_IMAGE (tests/deploy/build_image.sh builds every stage and passes
it) or, by default, the Dockerfile's runtime stage built from the binaries
already built here (MUON_SERVER_BIN, MUONCTL_BIN): the Dockerfile as it is,
with its build stage swapped for a small image holding them at the build
stage's paths.

The checks: the image's configuration (user, entrypoint, ports, volume,
health check); a container on host networking with a non-default --listen
and a read-only root filesystem, as the Helm chart runs it, reports healthy
and serves `muonctl` (health, a session, steps); the health check follows
MUON_LISTEN and a --flagfile too, and reports unhealthy when nothing serves;
SIGTERM drains and writes the session's checkpoint to the volume; a second
container on the same volume restores the session and steps it on.

podman runs with runc, cgroupfs and lowered default ulimits (containers.conf
below): crun 1.8 refuses this machine's cgroup layout, and podman's default
nofile/nproc limits need CAP_SYS_RESOURCE. Its storage and the cached base
image live in MUON_IMAGE_CACHE (default /var/tmp/muon-image-test), outside
the repository; the base is rebuilt when absent.

Exit 0: pass; 1: a check failed; 77: podman, buildah, mmdebstrap or runc is
not installed (CTest skip).
"""
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

CACHE = os.environ.get("MUON_IMAGE_CACHE", "/var/tmp/muon-image-test")
SOURCE = os.environ.get("MUON_SOURCE", os.path.join(os.path.dirname(__file__), "..", ".."))
BASE = "localhost/muon-test/debian12:base"
BINARIES = "localhost/muon-test/binaries:latest"
FAST_IMAGE = "localhost/muon-test/muon-server:runtime"
UID = 10001
CHECKPOINTS = "/var/lib/muon/checkpoints"
# Lowered so that containers start without CAP_SYS_RESOURCE.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{cache}/storage"
runroot = "{cache}/run"
"""
SKIP = 77


def podman_env():
    os.makedirs(CACHE, exist_ok=True)
    files = {"containers.conf": CONTAINERS_CONF, "storage.conf": STORAGE_CONF.format(cache=CACHE)}
    for name, text in files.items():
        with open(os.path.join(CACHE, name), "w") as f:
            f.write(text)
    return dict(os.environ, CONTAINERS_CONF=os.path.join(CACHE, "containers.conf"),
                CONTAINERS_STORAGE_CONF=os.path.join(CACHE, "storage.conf"))


ENV = None


def run(*args, check=True, timeout=600):
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out


def podman(*args, **kwargs):
    return run("podman", *args, **kwargs)


def apt_sources():
    """The files in /etc/apt that name Debian 12 (bookworm) suites, for mmdebstrap."""
    out = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")) + ["/etc/apt/sources.list"]:
        if os.path.isfile(path):
            with open(path) as f:
                if re.search(r"^(Suites:.*\bbookworm\b|deb\s.*\sbookworm\s)", f.read(), re.M):
                    out.append(path)
    if not out:
        raise AssertionError("no Debian 12 (bookworm) apt source in /etc/apt for mmdebstrap")
    return out


def ensure_base():
    """Imports a minbase Debian 12 from mmdebstrap unless the cache has it."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tarball = os.path.join(tmp, "debian12.tar")
        run("mmdebstrap", "--variant=minbase", "--include=ca-certificates", "bookworm", tarball,
            *apt_sources())
        podman("import", tarball, BASE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def linked(binary):
    """{soname: resolved path} of the libraries binary loads."""
    ldd = run("ldd", binary).stdout
    return dict(re.findall(r"^\s*(\S+) => (/\S+)", ldd, re.M))


def host_only_libraries(binaries):
    """Libraries the binaries load that no Debian package owns, minus
    prometheus-cpp's (the image copies those): the CUDA libraries of a build
    made where nvcc is. NVIDIA's repository, where the image gets libcublas
    from, cannot be reached here; the container gets the host's files."""
    paths = {}
    for b in binaries:
        for soname, path in linked(b).items():
            if not soname.startswith("libprometheus-cpp-"):
                paths[soname] = path
    def candidates(path):
        # dpkg may list a file under /lib or /usr/lib (merged /usr), and by
        # the path ldd shows or the one its symlinks lead to.
        real = os.path.realpath(path)
        return {path, real} | {p.replace("/usr/lib/", "/lib/", 1) for p in (path, real)}
    query = set().union(*(candidates(p) for p in paths.values()))
    owned = {line.partition(": ")[2] for line in
             run("dpkg", "-S", *sorted(query), check=False).stdout.splitlines()}
    return {soname: os.path.realpath(path) for soname, path in paths.items()
            if not candidates(path) & owned}


def build_fast_image(server_bin, muonctl_bin):
    """The Dockerfile's runtime stage over the binaries built here."""
    with tempfile.TemporaryDirectory(dir=CACHE) as ctx:
        for b in (server_bin, muonctl_bin):
            shutil.copy(b, ctx)
        prometheus = [p for s, p in linked(server_bin).items() if s.startswith("libprometheus-cpp-")]
        if len(prometheus) != 2:
            raise AssertionError(f"muon-server loads {prometheus}, expected prometheus-cpp core and pull")
        for p in prometheus:
            shutil.copy(os.path.realpath(p), os.path.join(ctx, os.path.basename(p)))
        with open(os.path.join(ctx, "Containerfile"), "w") as f:
            f.write("FROM scratch\n"
                    f"COPY {os.path.basename(server_bin)} {os.path.basename(muonctl_bin)} /src/build/bin/\n"
                    "COPY libprometheus-cpp-* /usr/lib/x86_64-linux-gnu/\n")
        podman("build", "--quiet", "-t", BINARIES, ctx)
    with open(os.path.join(SOURCE, "deploy", "Dockerfile")) as f:
        dockerfile = f.read()
    build = re.search(r"^FROM \$\{DEBIAN_IMAGE\} AS build$.*?(?=^FROM )", dockerfile, re.M | re.S)
    if not build:
        raise AssertionError("deploy/Dockerfile: no build stage followed by the runtime stage")
    # The runtime stage reads only deploy/ from the context.
    with tempfile.TemporaryDirectory(dir=CACHE) as ctx:
        shutil.copytree(os.path.join(SOURCE, "deploy"), os.path.join(ctx, "deploy"), symlinks=True)
        with open(os.path.join(ctx, "deploy", "Dockerfile"), "w") as f:
            f.write(dockerfile[:build.start()] + f"FROM {BINARIES} AS build\n\n"
                    + dockerfile[build.end():])
        podman("build", "--format", "docker", "--network", "host",
               "-f", os.path.join(ctx, "deploy", "Dockerfile"), "--build-arg", "CUDA=OFF",
               "--build-arg", f"DEBIAN_SLIM_IMAGE={BASE}", "-t", FAST_IMAGE, ctx)
    # The image this one replaced, untagged now: keep the cache from growing.
    podman("image", "prune", "--force")
    return FAST_IMAGE


class ImageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.muonctl_bin = os.environ["MUONCTL_BIN"]
        ensure_base()
        cls.image = os.environ.get("MUON_IMAGE")
        cls.run_args = []
        if not cls.image:
            binaries = (os.environ["MUON_SERVER_BIN"], cls.muonctl_bin)
            cls.image = build_fast_image(*binaries)
            host_only = host_only_libraries(binaries)
            unexpected = sorted(s for s in host_only if not s.startswith(("libcublas", "libcudart")))
            if unexpected:
                raise AssertionError(f"the binaries load {unexpected}, which no Debian package "
                                     "owns and the image cannot install")
            for soname, path in sorted(host_only.items()):
                cls.run_args += ["-v", f"{path}:/opt/muon-host-lib/{soname}:ro"]
            if cls.run_args:
                cls.run_args += ["-e", "LD_LIBRARY_PATH=/opt/muon-host-lib"]
        cls.tmp = tempfile.mkdtemp(prefix="muon-image-")
        cls.containers = []

    @classmethod
    def tearDownClass(cls):
        for name in cls.containers:
            podman("rm", "--force", "--time", "5", name, check=False)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def start(self, *args, entrypoint=None, volume=None, read_only=False, env=None, mounts=()):
        """Runs the image detached on host networking; returns its name. The
        health check is run by hand (podman's timers need systemd)."""
        name = f"muon-image-test-{os.getpid()}-{len(self.containers)}"
        self.containers.append(name)
        cmd = ["run", "--detach", "--name", name, "--network", "host",
               "--health-interval", "disable", *self.run_args]
        for key, value in (env or {}).items():
            cmd += ["-e", f"{key}={value}"]
        for mount in (volume and [f"{volume}:{CHECKPOINTS}"] or []) + list(mounts):
            cmd += ["-v", mount]
        if read_only:
            cmd += ["--read-only", "--tmpfs", "/tmp"]
        if entrypoint:
            cmd += ["--entrypoint", entrypoint]
        podman(*cmd, self.image, *args)
        return name

    def logs(self, name):
        out = podman("logs", name, check=False)
        return out.stdout + out.stderr

    def healthcheck(self, name):
        return podman("healthcheck", "run", name, check=False, timeout=60).returncode

    def wait_healthy(self, name):
        deadline = time.monotonic() + 60
        while self.healthcheck(name) != 0:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                self.fail(f"{name} never reported healthy ({state}):\n{self.logs(name)}")
            time.sleep(0.5)

    def muonctl(self, port, *args):
        out = subprocess.run([self.muonctl_bin, f"--server=127.0.0.1:{port}", *args],
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        return out.stdout

    def volume(self):
        path = tempfile.mkdtemp(dir=self.tmp)
        os.chown(path, UID, UID)
        return path

    def test_image_configuration(self):
        (config,) = json.loads(podman("image", "inspect", self.image).stdout)
        c = config["Config"]
        self.assertEqual(c["User"], f"{UID}:{UID}")
        self.assertEqual(c["Entrypoint"], ["muon-server"])
        self.assertEqual(set(c["ExposedPorts"]), {"50051/tcp", "9464/tcp"})
        self.assertEqual(set(c["Volumes"]), {CHECKPOINTS})
        self.assertIn("MUON_LISTEN=0.0.0.0:50051", c["Env"])
        self.assertEqual(config["Healthcheck"]["Test"], ["CMD", "muon-healthcheck"])
        self.assertEqual(c["StopSignal"], "SIGTERM")

    def test_serve_drain_checkpoint_restore(self):
        volume = self.volume()
        port, metrics = free_port(), free_port()
        first = self.start(f"--listen=127.0.0.1:{port}", f"--metrics_listen=127.0.0.1:{metrics}",
                           "--engine=cpu", volume=volume, read_only=True)
        self.wait_healthy(first)
        self.assertEqual(self.muonctl(port, "health").strip(), "SERVING")
        created = self.muonctl(port, "session", "create", "--model=small")
        session = re.search(r"session_id: (\S+)", created).group(1)
        token = re.search(r"token: (\S+)", created).group(1)
        bench = self.muonctl(port, "bench", f"--session={session}", f"--token={token}", "--keep",
                             "--model=small", "--steps=2", "--warmup=1")
        self.assertIn(f"kept session {session}", bench)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            self.assertRegex(r.read().decode(), r'(?m)^muon_steps_total\{outcome="ok"\} 3$')

        podman("stop", "--time", "60", first, timeout=120)
        state = json.loads(podman("inspect", first).stdout)[0]["State"]
        log = self.logs(first)
        self.assertEqual(state["ExitCode"], 0, log)
        self.assertIn("muon-server: signal 15, draining in-flight steps", log)
        self.assertIn(f"wrote 1 checkpoint(s) to {CHECKPOINTS}", log)
        self.assertIn("drained, exiting", log)
        checkpoint = os.path.join(volume, f"{session}.ckpt")
        self.assertTrue(os.path.isfile(checkpoint), os.listdir(volume))
        self.assertEqual(os.stat(checkpoint).st_uid, UID)

        port = free_port()
        second = self.start(f"--listen=127.0.0.1:{port}", "--metrics_listen=", "--engine=cpu",
                            volume=volume)
        self.wait_healthy(second)
        self.assertIn(f"1 session(s) restored from {CHECKPOINTS}", self.logs(second))
        info = self.muonctl(port, "session", "get", f"--session={session}", f"--token={token}")
        self.assertRegex(info, r"(?m)^step: 3$")
        self.muonctl(port, "bench", f"--session={session}", f"--token={token}", "--keep",
                     "--model=small", "--steps=1", "--warmup=0")
        info = self.muonctl(port, "session", "get", f"--session={session}", f"--token={token}")
        self.assertRegex(info, r"(?m)^step: 4$")

    def test_healthcheck_follows_the_listen_address(self):
        # The command line beats MUON_LISTEN, which names a port nothing serves.
        port, unused = free_port(), free_port()
        name = self.start("--listen", f"127.0.0.1:{port}", "--metrics_listen=", "--engine=cpu",
                          "--checkpoint_dir=", env={"MUON_LISTEN": f"127.0.0.1:{unused}"})
        self.wait_healthy(name)
        self.assertEqual(self.muonctl(port, "health").strip(), "SERVING")

        # MUON_LISTEN alone.
        port = free_port()
        name = self.start("--metrics_listen=", "--engine=cpu", "--checkpoint_dir=",
                          env={"MUON_LISTEN": f"127.0.0.1:{port}"})
        self.wait_healthy(name)
        self.assertEqual(self.muonctl(port, "health").strip(), "SERVING")

        # A flagfile where the Helm chart mounts it.
        port = free_port()
        flags = os.path.join(tempfile.mkdtemp(dir=self.tmp), "muon-server.flags")
        with open(flags, "w") as f:
            f.write(f"--listen=127.0.0.1:{port}\n--metrics_listen=\n--engine=cpu\n--checkpoint_dir=\n")
        os.chmod(flags, 0o644)
        name = self.start("--flagfile=/etc/muon/config/muon-server.flags",
                          mounts=[f"{flags}:/etc/muon/config/muon-server.flags:ro"])
        self.wait_healthy(name)
        self.assertEqual(self.muonctl(port, "health").strip(), "SERVING")

        # Nothing serving where the address says: unhealthy.
        name = self.start("300", entrypoint="sleep", env={"MUON_LISTEN": f"127.0.0.1:{free_port()}"})
        self.assertNotEqual(self.healthcheck(name), 0)


if __name__ == "__main__":
    for tool in ("podman", "buildah", "mmdebstrap", "runc"):
        if not shutil.which(tool):
            print(f"{tool} not found; skipping (scripts/setup installs it)")
            sys.exit(SKIP)
    ENV = podman_env()
    if sys.argv[1:] == ["--prepare"]:
        # build_image.sh: the podman configuration and the base image only.
        ensure_base()
        sys.exit(0)
    unittest.main()
