"""The Helm chart, rendered with Go's text/template + sprig, and its YAML linted."""
import json
import os
import subprocess
import tempfile
import unittest

import yaml

DEPLOY = os.environ["MUON_DEPLOY"]
CHART = os.path.join(DEPLOY, "helm", "muon-server")


def render(*args):
    out = subprocess.run([os.environ["MUON_RENDER"], CHART, *args], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return out.stdout


def by_kind(manifest):
    docs = {}
    for doc in yaml.safe_load_all(manifest):
        if doc:
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def yamllint(*paths):
    return subprocess.run([os.environ["MUON_YAMLLINT"], "--strict", "-c",
                           os.path.join(DEPLOY, ".yamllint"), *paths],
                          capture_output=True, text=True)


class ChartTest(unittest.TestCase):
    def test_values_and_chart_pass_yamllint(self):
        out = yamllint(os.path.join(CHART, "values.yaml"), os.path.join(CHART, "Chart.yaml"))
        self.assertEqual(out.returncode, 0, out.stdout)

    def test_rendered_manifests_pass_yamllint(self):
        for args in ([], ["--set", "serviceMonitor.enabled=true", "--set",
                          "grafanaDashboard.enabled=true", "--set", "adminToken.value=s3cret",
                          "--set", "tls.enabled=true", "--set", "tls.existingSecret=muon-tls"]):
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
        container = sts["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(container["resources"]["limits"]["nvidia.com/gpu"], 1)
        self.assertEqual(container["livenessProbe"]["grpc"]["port"], 50051)
        self.assertEqual(container["readinessProbe"]["grpc"]["port"], 50051)
        self.assertEqual(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "checkpoints")
        services = {s["metadata"]["name"]: s for s in docs["Service"]}
        self.assertEqual(services["test-muon-server-headless"]["spec"]["clusterIP"], "None")
        config = docs["ConfigMap"][0]["data"]
        self.assertEqual(config["MUON_LISTEN"], "0.0.0.0:50051")
        self.assertEqual(config["MUON_CHECKPOINT_DIR"], "/var/lib/muon/checkpoints")
        self.assertIn("preferredDuringSchedulingIgnoredDuringExecution",
                      sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"])
        self.assertEqual(docs["PodDisruptionBudget"][0]["spec"]["maxUnavailable"], 1)

    def test_options(self):
        docs = by_kind(render(
            "--set", "replicaCount=3", "--set", "serviceMonitor.enabled=true",
            "--set", "grafanaDashboard.enabled=true", "--set", "adminToken.value=s3cret",
            "--set", "podAntiAffinity=hard", "--set", "persistence.enabled=false",
            "--set", "server.extraFlags.durability=strict"))
        (sts,) = docs["StatefulSet"]
        self.assertEqual(sts["spec"]["replicas"], 3)
        self.assertNotIn("volumeClaimTemplates", sts["spec"])
        self.assertIn("requiredDuringSchedulingIgnoredDuringExecution",
                      sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"])
        self.assertEqual(docs["ServiceMonitor"][0]["spec"]["endpoints"][0]["port"], "metrics")
        secret = [s for s in docs["Secret"] if s["metadata"]["name"] == "test-muon-server-admin"]
        self.assertEqual(len(secret), 1)
        config = [c for c in docs["ConfigMap"] if c["metadata"]["name"] == "test-muon-server"][0]
        self.assertEqual(config["data"]["MUON_DURABILITY"], "strict")
        self.assertNotIn("MUON_CHECKPOINT_DIR", config["data"])
        dashboard = [c for c in docs["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")][0]
        self.assertEqual(json.loads(dashboard["data"]["muon-server.json"])["uid"], "muon-server")

    def test_tls_without_secret_fails(self):
        with self.assertRaisesRegex(AssertionError, "existingSecret"):
            render("--set", "tls.enabled=true")


if __name__ == "__main__":
    unittest.main()
