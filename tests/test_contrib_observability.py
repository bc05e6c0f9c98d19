"""The monitoring artifacts in contrib/: Prometheus alerting rules (contrib/prometheus/wlidd.rules.yml,
checked and unit-tested with promtool) and the Grafana dashboard (contrib/grafana/wlidd.json, generated
by contrib/grafana/dashboard.py with grafana-foundation-sdk).

Both name wlidd's metrics by hand, so every `wlidd_…` name in a rule expression or a panel query must be
one the daemon's registry (wlidd/metrics/) exposes: a renamed metric fails here, not silently in
production. promtool comes from Debian's `prometheus` package; without it the promtool tests skip, and
fail in CI (CLIENT_MATRIX_REQUIRED=1 or CI set, as for the client matrix: tests/clients/harness.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.clients.harness import unavailable
from wlidd.metrics import Family, Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "wlidd.rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "wlidd.rules.test.yml"
GENERATOR = ROOT / "contrib" / "grafana" / "dashboard.py"
MANIFEST = ROOT / "contrib" / "kubernetes" / "wlidd.yaml"
DASHBOARD = ROOT / "contrib" / "grafana" / "wlidd.json"

METRIC_NAME = re.compile(r"\bwlidd_[a-z0-9_]*[a-z0-9]")
JOB_MATCHER = re.compile(r'\bjob\s*(?:=~|!~|!=|=)\s*"')  # a selector naming a scrape job (not `by (job)`)
UP_MATCHER = re.compile(r'\bup\{(\w+)="([^"]*)"\}')  # up{label="value"}, one equality matcher
# The sample names each metric type puts on /metrics (prometheus_client's exposition; a counter family
# `x` is exposed as x_total and x_created, never as plain x).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}
SEVERITIES = {"critical", "warning"}


# ---- shared helpers ----------------------------------------------------------------------------------
def exposed_metric_names() -> set[str]:
    """Every sample name wlidd's registry can put on /metrics, from its metric families and their types."""
    families = Metrics().registry.collect()
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type or "unknown"]}


def metric_labels() -> dict[str, set[str]]:
    """{exposed sample name: its label names} for the metrics the Metrics object declares."""
    labels: dict[str, set[str]] = {}
    for family in vars(Metrics()).values():
        if isinstance(family, Family):
            for suffix in SUFFIXES[family.type or "unknown"]:
                labels[family.name + suffix] = set(family.labelnames)
    return labels


def metric_names_in(expressions: Iterable[str]) -> set[str]:
    """The wlidd_… names a set of PromQL expressions read."""
    return {name for expr in expressions for name in METRIC_NAME.findall(expr)}


def unknown_metrics(expressions: Iterable[str]) -> set[str]:
    """The wlidd_… names in `expressions` that wlidd's registry does not expose (empty: all exist)."""
    return metric_names_in(expressions) - exposed_metric_names()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool is not installed (apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False)


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, nested (collapsed rows) included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panels({"panels": panel.get("panels", [])}))
        else:
            found.append(panel)
    return found


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    queries = [target["expr"] for panel in panels(dashboard) for target in panel["targets"]]
    queries += [var["query"] for var in dashboard["templating"]["list"] if var["type"] == "query"]
    return queries


# ---- the metric-name helper itself ---------------------------------------------------------------------
def test_the_metric_check_knows_counters_by_their_total_name_and_refuses_renamed_ones() -> None:
    assert unknown_metrics(["rate(wlidd_token_refreshes_total[5m])", "wlidd_identity_valid == 0"]) == set()
    assert unknown_metrics(["wlidd_identity_vaild == 0"]) == {"wlidd_identity_vaild"}
    assert unknown_metrics(["rate(wlidd_token_refreshes[5m])"]) == {"wlidd_token_refreshes"}  # no _total
    assert unknown_metrics(['up{job="wlidd"} == 0']) == set()  # not a wlidd_ name


def test_the_metric_check_sees_collector_metrics_not_declared_as_attributes() -> None:
    assert "wlidd_log_lines_suppressed_total" in exposed_metric_names()


# ---- Prometheus rules ----------------------------------------------------------------------------------
def test_promtool_accepts_the_rules_file() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_behaves_as_its_promtool_unit_tests_say() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


def test_every_rule_reads_only_metrics_wlidd_exposes() -> None:
    assert unknown_metrics(rule["expr"] for rule in load_rules()) == set()


def test_no_rule_but_wlidd_down_names_a_scrape_job() -> None:
    """The DaemonSet is scraped through its prometheus.io/* annotations, in whatever job reads them
    (usually `kubernetes-pods`): every rule that can reads wlidd's own series instead of a job."""
    named = [rule["alert"] for rule in alerts() if JOB_MATCHER.search(rule["expr"])]
    assert named == ["WliddDown"], f"rules selecting a scrape job: {named}"


def test_wlidd_down_knows_the_systemd_job_and_the_daemonset_pod_label() -> None:
    """`up` has no wlidd series to tell a failed wlidd target apart: WliddDown matches job="wlidd" (README
    "Monitoring") or the DaemonSet pod's app.kubernetes.io/name label as a kubernetes-pods job's
    `labelmap: __meta_kubernetes_pod_label_(.+)` carries it (the name with each character outside
    [a-zA-Z0-9_] made `_`, as Kubernetes service discovery does)."""
    (rule,) = [rule for rule in alerts() if rule["alert"] == "WliddDown"]
    matchers = set(UP_MATCHER.findall(rule["expr"]))
    assert ("job", "wlidd") in matchers
    daemonset = next(doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc and doc["kind"] == "DaemonSet")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    mapped = {re.sub(r"[^a-zA-Z0-9_]", "_", name): value for name, value in pod_labels.items()}
    assert matchers - {("job", "wlidd")} <= set(mapped.items()), f"{matchers} are not the pod's labels {mapped}"
    assert len(matchers) == 2, "one matcher for each way wlidd is deployed"


@pytest.mark.parametrize("alert", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_has_severity_for_summary_description_and_runbook(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in SEVERITIES
    assert re.fullmatch(r"[1-9][0-9]*[smh]", alert["for"]), "a `for:` that waits out a blip"
    annotations = alert["annotations"]
    assert {"summary", "description", "runbook"} <= annotations.keys()
    assert "wlidd status" in annotations["runbook"] or "README" in annotations["runbook"]


@pytest.mark.parametrize("alert", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_on_an_identity_or_token_names_it_in_summary_and_description(alert: dict[str, Any]) -> None:
    labels = metric_labels()
    carried = set().union(*(labels.get(name, set()) for name in metric_names_in([alert["expr"]])))
    for label in {"identity", "source"} & carried:
        for key in ("summary", "description"):
            assert f"$labels.{label}" in alert["annotations"][key], f"{key} does not name the {label}"


# ---- Grafana dashboard ---------------------------------------------------------------------------------
def test_committed_dashboard_is_exactly_the_generators_output() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR)], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == DASHBOARD.read_text(), (
        "contrib/grafana/wlidd.json differs from the generator's output: edit contrib/grafana/dashboard.py, "
        "then run `python contrib/grafana/dashboard.py > contrib/grafana/wlidd.json`"
    )


def test_dashboard_has_the_fields_grafana_needs_to_import_it() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "wlidd"
    assert dashboard["title"] == "wlidd"
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


def test_every_panel_queries_the_chosen_data_source_and_daemons() -> None:
    for panel in panels(load_dashboard()):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"]
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"], target["expr"]


def test_dashboard_templating_offers_data_source_job_and_instance() -> None:
    variables = {var["name"]: var for var in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["includeAll"] and variables[name]["multi"]
    assert "$job" in variables["instance"]["query"]


def test_every_dashboard_query_reads_only_metrics_wlidd_exposes() -> None:
    queries = dashboard_queries(load_dashboard())
    assert metric_names_in(queries), "the dashboard reads wlidd metrics"
    assert unknown_metrics(queries) == set()


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query with Grafana's variables filled in, checked by promtool as a recording rule."""
    grafana_variables = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
    rules = []
    for number, expr in enumerate(dashboard_queries(load_dashboard())):
        for variable, value in grafana_variables.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):  # a Grafana function: check the series selector it wraps
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
