"""deploy/observability: the Prometheus alert rules pass `promtool check rules`, the Grafana
dashboard is a well-formed dashboard, and every metric either of them names is one a
Fabric server (origin, site agent, hook) really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers.registries import exposed_names, server_registries

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "deploy" / "observability"
RULES, DASHBOARD = OBS / "alerts.yml", OBS / "grafana-fabric.json"
PROMTOOL = shutil.which("promtool")
METRIC = re.compile(r"\b(fabric_[a-z0-9_]+)")
# what the rules must cover (the issue's list, and issue 12's refused and stale signed statements)
REQUIRED_ALERTS = {"FabricSiteNotReporting", "FabricSiteVersionStale", "FabricDeployFailing", "FabricCanaryRejected",
                   "FabricDiskAboveHighWatermark", "FabricChunksFailingVerification", "FabricSignatureRefused",
                   "FabricChannelStatementStale"}


def _rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus; make test installs it)")
def test_promtool_accepts_the_alert_rules():
    p = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(_rule_exprs())} rules found" in p.stdout


def test_the_rules_cover_stale_sites_failing_deploys_canaries_disk_integrity_and_signatures():
    assert REQUIRED_ALERTS <= set(_rule_exprs())


def test_every_metric_in_the_rules_and_the_dashboard_is_one_a_server_exposes(tmp_path):
    exposed = set().union(*(exposed_names(r) for r in server_registries(tmp_path).values()))
    named = {m for expr in [*_rule_exprs().values(), *_dashboard_exprs()] for m in METRIC.findall(expr)}
    assert len(named) >= 20
    assert sorted(named - exposed) == []


def test_the_dashboard_is_a_well_formed_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 10
    occupied = set()
    for p in dash["panels"]:
        assert p["type"] in {"timeseries", "table", "stat", "gauge"}, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")) and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_every_label_a_rule_or_panel_selects_on_is_one_its_metric_has(tmp_path):
    """`fabric_agent_channel_trust{state="unsigned"}` must select on a label the agent really
    sets: a misspelt label matches nothing, and its alert never fires."""
    labels: dict[str, set[str]] = {}
    for registry in server_registries(tmp_path).values():
        for collector in list(registry._collector_to_names):  # prometheus_client keeps no public label list
            for name in registry._collector_to_names[collector]:
                labels.setdefault(name, set()).update(getattr(collector, "_labelnames", ()))
    selected = re.compile(r"\b(fabric_[a-z0-9_]+)\{([^}]*)\}")
    wrong = []
    for expr in [*_rule_exprs().values(), *_dashboard_exprs()]:
        for metric, matchers in selected.findall(expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", matchers):
                if label not in labels.get(metric, set()) | {"instance", "job"}:
                    wrong.append(f"{metric}{{{label}}}")
    assert wrong == []
    assert {"code"} <= labels["fabric_agent_signature_refusals_total"]
    assert {"artifact", "channel", "state"} <= labels["fabric_agent_channel_trust"]
