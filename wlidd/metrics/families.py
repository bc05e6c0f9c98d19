"""The values of wlidd's metrics until prometheus_client reads them: counters and gauges by label values,
and the registry that hands them to prometheus_client at the first collect (a scrape of /metrics, a test).

`import prometheus_client` also imports its exposition's HTTP server, urllib.request, wsgiref and the email
package (~2.5 MB of the smallest node's RSS, bench/PROFILES.md), so the values are kept here, as plain
numbers per series, behind prometheus_client's interface and rules: `labels(...)` (label values as str, a
series made on first use), `inc` (never negative on a counter), `set`, `remove`; a counter's `_created`
time; the same samples in the same order, so /metrics reads the same. Values change on the event loop's
thread only (the daemon's one); a collect copies each series table before reading it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")  # the Prometheus data model's metric and label names
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class _Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class Registry:
    """One daemon's metrics for Prometheus: the declared counters and gauges, in order, then collectors of
    values read at scrape time (`register`), then prometheus_client's ProcessCollector (CPU, RSS, open
    descriptors and start time of this process). prometheus_client's CollectorRegistry over them is built
    by the first `collect` or `get_sample_value` (the module docstring)."""

    def __init__(self) -> None:
        self.families: list[Family[Any]] = []
        self._collectors: list[_Collector] = []
        self._prometheus: CollectorRegistry | None = None

    def declare(self, family: Family[Any]) -> None:
        if any(f.name == family.name for f in self.families):
            raise ValueError(f"Duplicated timeseries in CollectorRegistry: {family.name}")
        self.families.append(family)

    def register(self, collector: _Collector) -> None:
        self._collectors.append(collector)

    def collect(self) -> Iterable[Metric]:
        return self.prometheus().collect()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of sample `name` with exactly `labels`, None if there is none (as prometheus_client's)."""
        return self.prometheus().get_sample_value(name, labels)

    def prometheus(self) -> CollectorRegistry:
        """prometheus_client's registry over this one (built, and prometheus_client imported, once)."""
        if self._prometheus is None:
            from prometheus_client import CollectorRegistry, ProcessCollector
            from prometheus_client.registry import Collector

            class Collected(Collector):
                def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
                    self.collect = collect  # type: ignore[method-assign]

                def collect(self) -> Iterable[Metric]:
                    return ()

            registry = CollectorRegistry(auto_describe=True)
            registry.register(Collected(lambda: [family.metric() for family in self.families]))
            for collector in self._collectors:
                registry.register(Collected(collector.collect))
            ProcessCollector(registry=registry)
            self._prometheus = registry
        return self._prometheus


class Series:
    """One series of a family (one set of label values): its value, and when it was made (Unix time; a
    counter's `_created` sample)."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()


class CounterSeries(Series):
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeSeries(Series):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1) -> None:
        self.value += amount


S = TypeVar("S", bound=Series)


class Family(Generic[S]):
    """A metric: name, help text, type ("counter", "gauge"), label names, and its series by label values
    (as str, in the order they were first used). A family without label names has one series from the start."""

    type = ""

    @staticmethod
    def _new() -> S:
        raise NotImplementedError

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: Registry) -> None:
        if not _METRIC_NAME.fullmatch(name) or not all(_LABEL_NAME.fullmatch(label) for label in labelnames):
            raise ValueError(f"Invalid metric or label name: {name} {list(labelnames)}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], S] = {}
        if not self.labelnames:
            self._series[()] = self._new()
        registry.declare(self)

    def labels(self, *values: object) -> S:
        """The series of these label values (made on first use)."""
        if not self.labelnames:
            raise ValueError(f"No label names were set when constructing {self.type}:{self.name}")
        if len(values) != len(self.labelnames):
            raise ValueError("Incorrect label count")
        key = tuple(str(value) for value in values)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new()
        return series

    def remove(self, *values: object) -> None:
        """Drop the series of these label values (nothing if there is none)."""
        if not self.labelnames:
            raise ValueError(f"No label names were set when constructing {self.type}:{self.name}")
        if len(values) != len(self.labelnames):
            raise ValueError(f"Incorrect label count (expected {len(self.labelnames)}, got {values})")
        self._series.pop(tuple(str(value) for value in values), None)

    def metric(self) -> Metric:
        """This family as prometheus_client's Metric, with the samples its Counter or Gauge would give."""
        from prometheus_client.core import Metric

        metric = Metric(self.name, self.documentation, self.type)
        for values, series in list(self._series.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            for suffix, value in self._samples(series):
                metric.add_sample(self.name + suffix, dict(labels), value)
        return metric

    def _samples(self, series: S) -> Iterable[tuple[str, float]]:
        return (("", series.value),)


class Counter(Family[CounterSeries]):
    type = "counter"
    _new = CounterSeries

    def _samples(self, series: CounterSeries) -> Iterable[tuple[str, float]]:
        from prometheus_client import metrics  # PROMETHEUS_DISABLE_CREATED_SERIES, as its counters read it

        yield "_total", series.value
        if getattr(metrics, "_use_created", True):
            yield "_created", series.created


class Gauge(Family[GaugeSeries]):
    type = "gauge"
    _new = GaugeSeries

    def set(self, value: float) -> None:
        """Set the value of a gauge without labels."""
        if self.labelnames:
            raise ValueError(f"gauge metric is missing label values: {self.name}")
        self._series[()].set(value)
