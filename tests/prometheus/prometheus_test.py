#!/usr/bin/env python3
"""muon-server's /metrics as a real Prometheus sees them.

Starts muon-server (MUON_SERVER_BIN) on 127.0.0.1:0 with a free metrics port,
runs a known number of steps with muonctl (MUONCTL_BIN), starts Debian's
prometheus (PROMETHEUS_BIN, default /usr/bin/prometheus) scraping it every
second, and checks through Prometheus's HTTP query API that every family
arrived with the counts the steps imply. Then, after a short load that
Prometheus scrapes, every query of the Grafana dashboard (MUON_DASHBOARD,
deploy/grafana/muon-server.json; its variables set as Grafana would for this
one target) must return series with a finite value, and its variables'
label_values() queries must find the target. Everything it starts is stopped and
its temporary directory removed, pass or fail; the whole run is bounded by
DEADLINE_SECONDS.

Exit 0: pass; 1: a check failed; 77: prometheus is not installed (CTest skip).
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

STEPS = 5
WARMUP = 1
LOAD_STEPS = 5
DEADLINE_SECONDS = 180
# What Grafana puts for $__rate_interval at this dashboard's refresh: a
# window that holds the short load and several 1 s scrapes.
RATE_INTERVAL = "1m"
SKIP = 77


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, predicate, deadline):
    """Polls predicate until it returns a true value or the deadline passes."""
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def run(args):
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def query(prom_port, expr):
    """The instant vector of expr as {labels-as-tuple: value}; {} on error."""
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except OSError:
        return {}
    if body.get("status") != "success":
        return {}
    return {
        tuple(sorted((k, v) for k, v in s["metric"].items() if k not in ("job", "instance"))):
        float(s["value"][1])
        for s in body["data"]["result"]
    }


def series(prom_port, expr):
    """The raw result of an instant query: [(labels, value)], or Prometheus's
    error as a string."""
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        return e.read().decode(errors="replace")
    except OSError as e:
        return str(e)
    if body.get("status") != "success":
        return str(body)
    return [(s["metric"], float(s["value"][1])) for s in body["data"]["result"]]


def label_values(prom_port, label, match):
    """Grafana's label_values(match, label) through Prometheus's label API."""
    url = (f"http://127.0.0.1:{prom_port}/api/v1/label/{label}/values?"
           + urllib.parse.urlencode({"match[]": match}))
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r).get("data", [])
    except OSError:
        return []


def check_dashboard(prom_port, dashboard, variables):
    """Every panel target's expr, with the dashboard's variables substituted,
    returns at least one series with a finite value. Returns failures."""
    failures = []
    with open(dashboard) as f:
        panels = json.load(f)["panels"]
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for name, value in variables.items():
                expr = expr.replace("$" + name, value)
            if "$" in expr:
                failures.append(f"dashboard {panel['title']!r} {target['refId']}: unknown variable in {expr}")
                continue
            got = series(prom_port, expr)
            finite = [v for _, v in got if math.isfinite(v)] if isinstance(got, list) else []
            if not finite:
                failures.append(f"dashboard {panel['title']!r} {target['refId']}: {expr} returned "
                                f"{got or 'no series'}")
            else:
                print(f"ok   dashboard {panel['title']!r} {target['refId']}: {len(got)} series")
    return failures


def scalar(prom_port, expr):
    """The value of a one-series query, or None while Prometheus has none."""
    values = list(query(prom_port, expr).values())
    return values[0] if len(values) == 1 else None


def main():
    server_bin = os.environ.get("MUON_SERVER_BIN")
    muonctl = os.environ.get("MUONCTL_BIN")
    prometheus = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")
    if not server_bin or not muonctl:
        print("set MUON_SERVER_BIN and MUONCTL_BIN", file=sys.stderr)
        return 1
    if not os.access(prometheus, os.X_OK):
        print(f"{prometheus} not found; skipping (apt-get install prometheus)")
        return SKIP

    deadline = time.monotonic() + DEADLINE_SECONDS
    tmp = tempfile.mkdtemp(prefix="muon-prom-")
    procs = []
    failures = []
    try:
        metrics_port = free_port()
        port_file = os.path.join(tmp, "port")
        server_log = open(os.path.join(tmp, "server.log"), "w")
        procs.append(subprocess.Popen(
            [server_bin, "--listen=127.0.0.1:0", f"--port_file={port_file}",
             f"--metrics_listen=127.0.0.1:{metrics_port}", "--engine=cpu",
             "--orthogonality_sample_every=1"],
            stdout=server_log, stderr=subprocess.STDOUT))

        def read_port():
            try:
                with open(port_file) as f:
                    return int(f.read().strip() or 0)
            except (OSError, ValueError):
                return 0
        port = wait_for("muon-server's port file", read_port, deadline)
        server = f"--server=127.0.0.1:{port}"

        # A session kept alive, so muon_sessions and engine memory are non-zero.
        created = run([muonctl, "session", "create", server, "--model=small"])
        session = re.search(r"session_id: (\S+)", created).group(1)
        token = "--token=" + re.search(r"token: (\S+)", created).group(1)
        info = run([muonctl, "session", "get", server, f"--session={session}", token])
        shapes = re.findall(r"^param \d+: \S+ \[([\dx]+)\] DTYPE_FLOAT32 OPTIMIZER_KIND_MUON",
                            info, re.M)
        params = int(re.search(r"num_params: (\d+)", info).group(1))
        if len(shapes) != params:
            raise RuntimeError(f"expected {params} float32 Muon parameters in:\n{info}")
        step_bytes = 0
        for shape in shapes:
            n = 1
            for d in shape.split("x"):
                n *= int(d)
            step_bytes += 4 * n
        run([muonctl, "bench", server, f"--session={session}", token, "--keep", "--model=small",
             f"--steps={STEPS}", f"--warmup={WARMUP}"])
        # One rejected call: GetSession of an unknown id is NOT_FOUND.
        subprocess.run([muonctl, "session", "get", server, "--session=0000000000000000"],
                       capture_output=True, timeout=60)

        prom_port = free_port()
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: muon\n"
                    f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
        prom_log = open(os.path.join(tmp, "prometheus.log"), "w")
        procs.append(subprocess.Popen(
            [prometheus, f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=prom_log, stderr=subprocess.STDOUT))
        wait_for("the muon target to be up",
                 lambda: scalar(prom_port, 'up{job="muon"}') == 1, deadline)

        steps = STEPS + WARMUP
        expected = {
            'muon_steps_total{outcome="ok"}': steps,
            'muon_steps_total{outcome="invalid"}': 0,
            'muon_steps_total{outcome="aborted"}': 0,
            'muon_steps_total{outcome="retried"}': 0,
            'muon_received_bytes_total': steps * step_bytes,
            'muon_sent_bytes_total': steps * step_bytes,
            'muon_parameters_updated_total': steps * params,
            'muon_orthogonality_error_count{schedule="jordan"}': steps * params,
            'muon_orthogonality_error_bucket{schedule="jordan",le="+Inf"}': steps * params,
            'muon_sessions': 1,
            'muon_sessions_created_total': 1,
            'muon_active_streams': 0,
            'muon_grpc_requests_total{method="Step",code="OK"}': steps,
            'muon_grpc_requests_total{method="CreateSession",code="OK"}': 1,
            'muon_grpc_requests_total{method="GetSession",code="NOT_FOUND"}': 1,
        }
        for phase in ("receive", "queue", "compute", "send", "total"):
            expected[f'muon_step_duration_seconds_count{{phase="{phase}"}}'] = steps
            expected[f'muon_step_duration_seconds_bucket{{phase="{phase}",le="+Inf"}}'] = steps

        # The first scrape may predate the last step's bookkeeping: wait for
        # the counters to settle, then compare.
        def settled():
            return all(scalar(prom_port, e) == v for e, v in expected.items())
        try:
            wait_for("the expected values", settled, deadline)
        except TimeoutError:
            pass
        for expr, want in expected.items():
            got = scalar(prom_port, expr)
            if got != want:
                failures.append(f"{expr}: got {got}, want {want}")
            else:
                print(f"ok   {expr} == {want}")
        used = scalar(prom_port, 'muon_engine_memory_bytes{kind="used"}')
        if used is None or used < step_bytes:
            failures.append(f'muon_engine_memory_bytes{{kind="used"}}: got {used}, '
                            f"want >= {step_bytes} (the session's momentum)")
        budget = scalar(prom_port, 'muon_engine_memory_bytes{kind="budget"}')
        if budget is None or budget < used:
            failures.append(f'muon_engine_memory_bytes{{kind="budget"}}: got {budget}, '
                            "want the machine's memory (the default), at least what is used")
        p50 = scalar(prom_port, 'histogram_quantile(0.5, muon_step_duration_seconds_bucket'
                                '{phase="total"})')
        if p50 is None or not 0 < p50 <= 60:
            failures.append(f"p50 of total step time: got {p50}, want in (0, 60] s")
        ortho = scalar(prom_port, 'histogram_quantile(0.5, muon_orthogonality_error_bucket'
                                  '{schedule="jordan"})')
        if ortho is None or not 1e-4 <= ortho <= 1:
            failures.append(f"p50 of the orthogonality error: got {ortho}, want in [1e-4, 1]")

        # The dashboard: a short load while Prometheus scrapes, then every
        # panel's query.
        dashboard = os.environ.get("MUON_DASHBOARD")
        if not dashboard:
            raise RuntimeError("set MUON_DASHBOARD to deploy/grafana/muon-server.json")
        run([muonctl, "bench", server, "--model=small", f"--steps={LOAD_STEPS}", "--warmup=0"])
        total = steps + LOAD_STEPS
        wait_for("the load's steps to be scraped",
                 lambda: scalar(prom_port, 'muon_steps_total{outcome="ok"}') == total, deadline)
        instance = f"127.0.0.1:{metrics_port}"
        for label, match, want in (("job", "muon_sessions", "muon"),
                                   ("instance", 'muon_sessions{job=~"muon"}', instance)):
            got = label_values(prom_port, label, match)
            if want not in got:
                failures.append(f"dashboard variable {label}: label_values({match}, {label}) "
                                f"gave {got}, want {want}")
        # "All" of one job and one instance, as Grafana substitutes it: the
        # values regex-escaped, in a PromQL string (so "\\.").
        failures += check_dashboard(prom_port, dashboard,
                                    {"job": "muon", "instance": instance.replace(".", "\\\\.")})
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, AttributeError) as e:
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if failures:
            for name in ("server.log", "prometheus.log"):
                path = os.path.join(tmp, name)
                if os.path.exists(path):
                    with open(path) as f:
                        print(f"--- {name} (tail)\n" + "".join(f.readlines()[-20:]))
        shutil.rmtree(tmp, ignore_errors=True)

    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
