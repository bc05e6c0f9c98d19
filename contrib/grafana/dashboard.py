"""The wlidd Grafana dashboard, built with grafana-foundation-sdk (its Grafana 11.6 types).

    python contrib/grafana/dashboard.py > contrib/grafana/wlidd.json

wlidd.json is generated: change this file, regenerate, commit both (tests/test_contrib_observability.py
fails when they differ). Import it in Grafana (Dashboards → New → Import) and pick a Prometheus data
source; `job` and `instance` narrow it to some daemons.

Every query reads wlidd's own series (README "Metrics", wlidd/metrics/) and the scrape's `up`; nothing
depends on the alerting rules in contrib/prometheus being loaded. Shapes: *_timestamp_seconds gauges are
Unix seconds (shown as time left or age, in seconds); counters are shown as increases per
$__rate_interval (events) or rates (requests per second).
"""

from __future__ import annotations

import sys

from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    GraphDrawStyle,
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

UID = "wlidd"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every wlidd query is narrowed to the chosen daemons.
SEL = 'job=~"$job", instance=~"$instance"'
# The series every daemon has (its Unix socket listener always runs): the variables list daemons from it.
ALWAYS_THERE = "wlidd_listener_up"
# WliddIdentityExpiringSoon's threshold (contrib/prometheus/wlidd.rules.yml), drawn on the time-left panel.
IDENTITY_WARN_SECONDS = 15 * 60


def query(expr: str, legend: str, ref: str = "A") -> PrometheusQuery:
    return PrometheusQuery().expr(expr).legend_format(legend).ref_id(ref)


def increase(metric: str, by: str, matchers: str = "") -> str:
    """Events in the trailing $__rate_interval of the counter `metric` (its _total series), summed by `by`.
    $__rate_interval (at least 4 scrape intervals) always holds two samples, which increase() needs."""
    extra = f", {matchers}" if matchers else ""
    return f"sum by ({by}) (increase({metric}_total{{{SEL}{extra}}}[$__rate_interval]))"


def timeseries(
    title: str, description: str, *targets: PrometheusQuery, unit: str = "short", width: int = 12
) -> Timeseries:
    """Lines, one per series; the tooltip lists every series, largest first."""
    panel = (
        Timeseries()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(width)
        .fill_opacity(10)
        .legend(
            VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM).show_legend(True)
        )
        .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def events(title: str, description: str, *targets: PrometheusQuery, width: int = 12) -> Timeseries:
    """Event counts (increase() over the trailing $__rate_interval): lines from 0. Not bars: the windows
    of neighbouring points overlap, so one event shows in several of them."""
    return timeseries(title, description, *targets, width=width).min(0)


def count_stat(title: str, description: str, expr: str) -> Stat:
    """A number that should be 0 (green), red from 1."""
    return (
        Stat()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(query(f"{expr} or vector(0)", title))
        .height(4)
        .span(4)
        .decimals(0)
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.NONE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(
            ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=None, color="green"), Threshold(value=1, color="red")])
        )
    )


def state_stat(title: str, description: str, expr: str, legend: str, good: str, bad: str) -> Stat:
    """One tile per series of a 0/1 gauge: 1 is `good` (green), 0 is `bad` (red)."""
    return (
        Stat()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(query(expr, legend))
        .height(8)
        .span(8)
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.NONE)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .mappings(
            [
                ValueMap(
                    {
                        "0": ValueMappingResult(text=bad, color="red", index=0),
                        "1": ValueMappingResult(text=good, color="green", index=1),
                    }
                )
            ]
        )
    )


def overview(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Overview"))
        .with_panel(
            count_stat(
                "wlidd targets down",
                "Daemons Prometheus cannot scrape (up == 0; alert WliddDown).",
                f"count(up{{{SEL}}} == 0)",
            )
        )
        .with_panel(
            count_stat(
                "Identities not valid",
                "Identities without a valid SVID now (wlidd_identity_valid == 0; alert WliddIdentityInvalid).",
                f"count(wlidd_identity_valid{{{SEL}}} == 0)",
            )
        )
        .with_panel(
            count_stat(
                "Tokens not servable",
                "Token sources with no token they may serve now (wlidd_token_valid == 0). An idle on_demand "
                "source counts here by design; alert WliddTokenNotServable fires only for failing ones.",
                f"count(wlidd_token_valid{{{SEL}}} == 0)",
            )
        )
        .with_panel(
            count_stat(
                "Trust bundle problems",
                "Federated trust bundles that cannot be read or parsed (wlidd_trust_bundle_problem; alert "
                "WliddTrustBundleProblem). Their last good copy is served.",
                f"count(wlidd_trust_bundle_problem{{{SEL}}})",
            )
        )
        .with_panel(
            count_stat(
                "Sinks failing",
                "Credential and token sinks whose last write failed (wlidd_sink_write_failing; alert "
                "WliddSinkWriteFailing). Their files keep the last good content; `wlidd status` names them.",
                f"sum(wlidd_sink_write_failing{{{SEL}}})",
            )
        )
        .with_panel(
            count_stat(
                "Listeners down",
                "Listeners whose accept loop is not running (wlidd_listener_up == 0; alert WliddListenerDown). "
                "wlidd withholds its watchdog pings then.",
                f"count(wlidd_listener_up{{{SEL}}} == 0)",
            )
        )
        .with_panel(
            count_stat(
                "Envoys on a rejected secret",
                "Open Envoy SDS streams whose Envoy rejected (NACKed) the last secrets sent and has accepted none "
                "since (wlidd_sds_streams_nacked; alert WliddEnvoyRejectsSecrets). `wlidd status` names the resources.",
                f"sum(wlidd_sds_streams_nacked{{{SEL}}})",
            )
        )
        .with_panel(
            Stat()
            .title("Workload API streams")
            .description("Open SPIFFE Workload API streams (connected clients), all chosen daemons.")
            .datasource(DATASOURCE)
            .with_target(query(f"sum(wlidd_workload_api_streams{{{SEL}}}) or vector(0)", "streams"))
            .height(4)
            .span(4)
            .decimals(0)
            .graph_mode(BigValueGraphMode.AREA)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
    )


def identities(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Identities"))
        .with_panel(
            state_stat(
                "Identity valid",
                "Whether each identity has a valid X.509-SVID now (wlidd_identity_valid, recomputed at each scrape).",
                f"wlidd_identity_valid{{{SEL}}}",
                "{{instance}} {{identity}}",
                "valid",
                "INVALID",
            )
        )
        .with_panel(
            timeseries(
                "Identity time left",
                "Seconds until each identity's current SVID chain expires (wlidd_identity_not_after_timestamp_seconds"
                " - time()). A rotation makes it jump up; the dashed line is WliddIdentityExpiringSoon's 15 min.",
                query(f"wlidd_identity_not_after_timestamp_seconds{{{SEL}}} - time()", "{{instance}} {{identity}}"),
                unit="s",
                width=16,
            )
            .thresholds(
                ThresholdsConfig()
                .mode(ThresholdsMode.ABSOLUTE)
                .steps([Threshold(value=None, color="red"), Threshold(value=IDENTITY_WARN_SECONDS, color="green")])
            )
            .thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED))
        )
        .with_panel(
            events(
                "Rotations",
                'New SVIDs loaded per rate window (wlidd_identity_reloads_total{result="updated"}).',
                query(
                    increase("wlidd_identity_reloads", "instance, identity", 'result="updated"'),
                    "{{instance}} {{identity}}",
                ),
                width=8,
            )
        )
        .with_panel(
            events(
                "Reloads by result",
                "Credential re-reads per rate window by result: updated (a rotation), unchanged, rejected, retried "
                "(a set caught mid-write, read again), deferred (out of descriptors or memory).",
                query(
                    increase("wlidd_identity_reloads", "instance, identity, result"),
                    "{{instance}} {{identity}} {{result}}",
                ),
                width=8,
            )
        )
        .with_panel(
            events(
                "SVID rejections by reason",
                'Credential sets refused per rate window, by stable reason (README "Troubleshooting"; alert '
                "WliddIdentityRejected). The last good SVID is kept.",
                query(
                    increase("wlidd_identity_rejections", "instance, identity, reason"),
                    "{{instance}} {{identity}} {{reason}}",
                ),
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Time since last rotation",
                "Seconds since each identity's current SVID was loaded (wlidd_identity_last_reload_timestamp_seconds).",
                query(f"time() - wlidd_identity_last_reload_timestamp_seconds{{{SEL}}}", "{{instance}} {{identity}}"),
                unit="s",
            )
        )
        .with_panel(
            timeseries(
                "Trust bundle problems",
                "1 while a federated trust domain's bundle cannot be read or parsed (wlidd_trust_bundle_problem); "
                "no series when all bundles are good.",
                query(f"wlidd_trust_bundle_problem{{{SEL}}}", "{{instance}} {{identity}} → {{trust_domain}}"),
            )
            .no_value("no problems")
            .draw_style(GraphDrawStyle.POINTS)
        )
    )


def tokens(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Tokens"))
        .with_panel(
            state_stat(
                "Token servable",
                "Whether each token source has a token it may serve now, outside its skew (wlidd_token_valid). "
                "An idle on_demand source is not servable by design.",
                f"wlidd_token_valid{{{SEL}}}",
                "{{instance}} {{source}}",
                "servable",
                "NOT SERVABLE",
            )
        )
        .with_panel(
            timeseries(
                "Token time left",
                "Seconds until each source's current token expires (wlidd_token_expiry_timestamp_seconds - time()). "
                "wlidd refreshes at about 80 % of the lifetime and stops serving within skew (60 s) of expiry.",
                query(f"wlidd_token_expiry_timestamp_seconds{{{SEL}}} - time()", "{{instance}} {{source}}"),
                unit="s",
                width=16,
            )
        )
        .with_panel(
            events(
                "Token refreshes by result",
                "Token fetches per rate window by result (wlidd_token_refreshes_total).",
                query(
                    increase("wlidd_token_refreshes", "instance, source, result"), "{{instance}} {{source}} {{result}}"
                ),
                width=8,
            )
        )
        .with_panel(
            events(
                "Token failures by reason",
                "Failed fetches and ID-token mints per rate window, by stable reason <upstream>_<code> "
                '(wlidd_token_failures_total; README "Troubleshooting"; alert WliddTokenRefreshFailing).',
                query(
                    increase("wlidd_token_failures", "instance, source, reason"), "{{instance}} {{source}} {{reason}}"
                ),
                width=8,
            )
        )
        .with_panel(
            events(
                "Upstream calls by kind",
                "Upstream calls per rate window (wlidd_token_upstream_calls_total): token (an access-token fetch "
                "chain), id_token (one mint), scoped_token (a token for scopes a metadata caller named).",
                query(
                    increase("wlidd_token_upstream_calls", "instance, source, kind"), "{{instance}} {{source}} {{kind}}"
                ),
                width=8,
            )
        )
    )


def local_api(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Local API and listeners"))
        .with_panel(
            timeseries(
                "API requests by route and status",
                "Local API requests per second (wlidd_http_requests_total) by listener, route template and status.",
                query(
                    f"sum by (listener, route, status) (rate(wlidd_http_requests_total{{{SEL}}}[$__rate_interval]))",
                    "{{listener}} {{route}} {{status}}",
                ),
                unit="reqps",
            )
        )
        .with_panel(
            timeseries(
                "Open connections by listener",
                "Open connections, counted from accept (wlidd_connections_open).",
                query(f"sum by (instance, listener) (wlidd_connections_open{{{SEL}}})", "{{instance}} {{listener}}"),
            )
        )
        .with_panel(
            events(
                "Connections refused and shed",
                "Connections refused at accept by the caps (wlidd_connections_refused_total, by reason) and idle "
                "connections closed to make room (wlidd_connections_shed_total).",
                query(
                    increase("wlidd_connections_refused", "instance, listener, reason"),
                    "{{instance}} {{listener}} refused {{reason}}",
                ),
                query(increase("wlidd_connections_shed", "instance, listener"), "{{instance}} {{listener}} shed", "B"),
                width=8,
            )
        )
        .with_panel(
            events(
                "accept() errors",
                "Failed accept() calls by errno (wlidd_accept_errors_total; alert WliddAcceptErrors): the process or "
                "host is out of descriptors or memory.",
                query(
                    increase("wlidd_accept_errors", "instance, listener, error"), "{{instance}} {{listener}} {{error}}"
                ),
                width=8,
            )
        )
        .with_panel(
            events(
                "Suppressed log lines",
                "Repeated log lines (failed handshakes, denials) counted instead of written "
                "(wlidd_log_lines_suppressed_total).",
                query(increase("wlidd_log_lines_suppressed", "instance, event"), "{{instance}} {{event}}"),
                width=8,
            )
        )
    )


def workload_api(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("SPIFFE Workload API"))
        .with_panel(
            timeseries(
                "Workload API streams",
                "Open Workload API streams, i.e. connected clients (wlidd_workload_api_streams).",
                query(f"sum by (instance) (wlidd_workload_api_streams{{{SEL}}})", "{{instance}}"),
                width=8,
            )
        )
        .with_panel(
            events(
                "Workload API pushes",
                "Messages sent to Workload API clients per rate window, by identity (wlidd_workload_api_pushes_total): "
                "one per stream per change.",
                query(increase("wlidd_workload_api_pushes", "instance, identity"), "{{instance}} {{identity}}"),
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Time since last push",
                "Seconds since an identity's state was last pushed to a Workload API client "
                "(wlidd_workload_api_last_push_timestamp_seconds).",
                query(f"time() - wlidd_workload_api_last_push_timestamp_seconds{{{SEL}}}", "{{instance}} {{identity}}"),
                unit="s",
                width=8,
            )
        )
    )


def envoy_sds(dashboard: Dashboard) -> Dashboard:
    return (
        dashboard.with_row(Row("Envoy SDS"))
        .with_panel(
            timeseries(
                "SDS streams",
                "Open Envoy SDS streams by method (wlidd_sds_streams), and those whose Envoy rejected the last "
                "secrets sent and has accepted none since (wlidd_sds_streams_nacked): it runs on an older secret.",
                query(f"sum by (instance, method) (wlidd_sds_streams{{{SEL}}})", "{{instance}} {{method}}"),
                query(
                    f"sum by (instance, method) (wlidd_sds_streams_nacked{{{SEL}}})",
                    "{{instance}} {{method}} on a rejected secret",
                    "B",
                ),
                width=8,
            )
        )
        .with_panel(
            events(
                "SDS pushes",
                "SDS responses sent to Envoy per rate window, by method (wlidd_sds_pushes_total): one per stream "
                "per change of what it asked for, and one per FetchSecrets call.",
                query(increase("wlidd_sds_pushes", "instance, method"), "{{instance}} {{method}}"),
                width=8,
            )
        )
        .with_panel(
            events(
                "SDS NACKs",
                "SDS responses Envoy rejected per rate window, by method (wlidd_sds_nacks_total). wlidd resends a "
                "rejected version only once its content changes; the log line `Envoy rejected the secrets sent` "
                "has Envoy's error.",
                query(increase("wlidd_sds_nacks", "instance, method"), "{{instance}} {{method}}"),
                width=8,
            )
        )
    )


def variables(dashboard: Dashboard) -> Dashboard:
    every = VariableOption(selected=True, text="All", value="$__all")
    return (
        dashboard.with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query(f"label_values({ALWAYS_THERE}, job)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(every)
        )
        .with_variable(
            QueryVariable("instance")
            .label("Instance")
            .datasource(DATASOURCE)
            .query(f'label_values({ALWAYS_THERE}{{job=~"$job"}}, instance)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(every)
        )
    )


def numbered(dashboard: Dashboard) -> Dashboard:
    """Panel ids 1, 2, … in layout order (Grafana addresses a panel by its id: links, viewPanel=)."""
    for number, panel in enumerate(dashboard.build().panels or [], start=1):
        panel.id_val = number
    return dashboard


def build() -> Dashboard:
    dashboard = (
        Dashboard("wlidd")
        .uid(UID)
        .description(
            'wlidd workload identity daemon: SVIDs, tokens, local API, Workload API, Envoy SDS (README "Monitoring").'
        )
        .tags(["wlidd", "spiffe", "workload-identity"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("1m")
        .time("now-6h", "now")
        .timezone("browser")
    )
    for section in (variables, overview, identities, tokens, local_api, workload_api, envoy_sds):
        dashboard = section(dashboard)
    return numbered(dashboard)


def render() -> str:
    """The dashboard as Grafana's JSON model: sorted keys, two-space indent, a final newline."""
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(build().build()) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
