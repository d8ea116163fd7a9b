"""The Grafana dashboard of largo, built with grafana-foundation-sdk and written to
charts/largo/files/dashboard.json (`make dashboard`; `make verify` fails when the file is stale).

Every panel queries a series the operator exports (docs/observability.md); the integration test runs
each query against a real Prometheus and fails when one does not parse or returns nothing.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder

OUT = Path("charts/largo/files/dashboard.json")
PER_JOB = "{{namespace}}/{{trainjob}}"


def _query(expr: str, legend: str = "") -> Dataquery:
    query = Dataquery().expr(expr)
    return query.legend_format(legend) if legend else query


def _series(title: str, unit: str, *queries: Dataquery) -> Timeseries:
    panel = Timeseries().title(title).unit(unit).height(8).span(12)
    for query in queries:
        panel = panel.with_target(query)
    return panel


def build() -> Dashboard:
    return (
        Dashboard("largo")
        .uid("largo-overview")
        .tags(["largo", "gpu"])
        .refresh("30s")
        .time("now-3h", "now")
        .with_row(Row("GPUs"))
        .with_panel(
            Stat()
            .title("GPUs held")
            .unit("percentunit")
            .height(4)
            .span(6)
            .with_target(_query("max(largo_cluster_gpu_allocation_ratio)"))
        )
        .with_panel(
            Stat()
            .title("Free GPUs the head of the queue cannot use")
            .unit("short")
            .height(4)
            .span(6)
            .with_target(_query("max(largo_cluster_gpus_stranded)"))
        )
        .with_panel(
            _series(
                "GPUs held by node",
                "short",
                _query("max by (node, owner) (largo_node_gpus_allocated)", "{{node}} {{owner}}"),
            )
        )
        .with_panel(
            _series(
                "GPUs by namespace and queue",
                "short",
                _query(
                    "max by (namespace, queue, state) (largo_queue_gpus)", "{{namespace}}/{{queue}} {{state}}"
                ),
            )
        )
        .with_panel(
            _series(
                "Fragmentation: pods that fit now",
                "short",
                _query(
                    "max by (gpus_per_pod) (largo_cluster_largest_gang_pods)", "{{gpus_per_pod}} GPUs/pod"
                ),
            )
        )
        .with_row(Row("Jobs"))
        .with_panel(
            _series("TrainJobs by phase", "short", _query("max by (phase) (largo_trainjobs)", "{{phase}}"))
        )
        .with_panel(
            _series(
                "Queue wait (90th percentile)",
                "s",
                _query(
                    "histogram_quantile(0.9, sum by (le) "
                    "(rate(largo_queue_wait_seconds_bucket[$__rate_interval])))"
                ),
            )
        )
        .with_panel(
            _series(
                "Decisions",
                "short",
                _query("sum by (reason) (increase(largo_events_total[$__rate_interval]))", "{{reason}}"),
            )
        )
        .with_row(Row("Training"))
        .with_panel(
            _series(
                "Training throughput",
                "short",
                _query(
                    "sum by (namespace, trainjob) (largo_train_tokens_per_second)",
                    "{{namespace}}/{{trainjob}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Share of a step in the all-reduce",
                "percentunit",
                _query(
                    "max by (namespace, trainjob) (largo_train_collective_share)",
                    "{{namespace}}/{{trainjob}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Work at risk: seconds since the newest checkpoint",
                "s",
                _query("max by (namespace, trainjob) (largo_trainjob_checkpoint_age_seconds)", PER_JOB),
            )
        )
        .with_row(Row("Serving"))
        .with_panel(
            _series(
                "InferenceService replicas",
                "short",
                _query(
                    "max by (namespace, service, state) (largo_inferenceservice_replicas)",
                    "{{namespace}}/{{service}} {{state}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Serving latency (99th percentile, first byte to last)",
                "s",
                _query(
                    "histogram_quantile(0.99, sum by (le, namespace, inferenceservice) "
                    "(rate(largo_serve_request_seconds_bucket[$__rate_interval])))",
                    "{{namespace}}/{{inferenceservice}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Requests in flight per replica (router)",
                "short",
                _query(
                    "sum by (namespace, inferenceservice, server) "
                    '(haproxy_server_current_sessions{proxy="replicas"})',
                    "{{namespace}}/{{server}}",
                ),
                _query(
                    "sum by (namespace, inferenceservice) (largo_router_requests_held)",
                    "{{namespace}}/{{inferenceservice}} held (no replica ready)",
                ),
            )
        )
        .with_panel(
            _series(
                "Replica response time (router, average of the last 1,024)",
                "s",
                _query(
                    "max by (namespace, server) "
                    '(haproxy_server_response_time_average_seconds{proxy="replicas"})',
                    "{{namespace}}/{{server}}",
                ),
            )
        )
        .with_row(Row("Operator"))
        .with_panel(
            _series(
                "Reconcile time (99th percentile)",
                "s",
                _query(
                    "histogram_quantile(0.99, sum by (le) "
                    "(rate(largo_reconcile_duration_seconds_bucket[$__rate_interval])))"
                ),
            )
        )
        .with_panel(
            _series(
                "Work queue and leader",
                "short",
                _query("max(largo_workqueue_depth)", "queued keys"),
                _query("max(largo_leader)", "leader"),
            )
        )
    )


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m largo.dev.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff if the file is stale")
    args = parser.parse_args(argv)
    rendered = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != rendered:
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(True), rendered.splitlines(True), str(args.out), "generated"
                )
            )
            print(f"{args.out} is out of date; run `make dashboard`.", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
