"""How many calls this daemon admits and how much of that is in use: what ``/offer``, ``/readyz`` and the
autoscaler's gauges read.

``max_streams = "auto"`` (the default) admits as many streams as the engine
measures it can serve at an acceptable cadence on this machine
(``StreamEngine.capacity()``, asked at the moment of each decision, since the
measurement follows the load); an explicit number wins over the measurement.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kfgan_daemon.engine import StreamEngine

MaxStreams = int | Literal["auto"]

CAPACITY_STREAMS = "kfgan_capacity_streams"
# The gauge a HorizontalPodAutoscaler scales on (deploy/kubernetes).
CAPACITY_IN_USE = "kfgan_capacity_in_use_ratio"


def stream_limit(max_streams: MaxStreams, engine: StreamEngine) -> int:
    """The streams admitted now: an explicit ``max_streams``, else the engine's measured capacity."""
    return engine.capacity() if max_streams == "auto" else max_streams


def capacity_in_use(max_streams: MaxStreams, engine: StreamEngine, live: int) -> float:
    """Share of the capacity in use, above 1 when overloaded.

    Under "auto" the engine's own measure (its open streams over its
    capacity); with an explicit ``max_streams``, live calls over that number,
    since that is then what refuses callers.
    """
    return engine.capacity_in_use() if max_streams == "auto" else live / max_streams


class CapacityCollector(Collector):
    """``kfgan_capacity_streams`` and ``kfgan_capacity_in_use_ratio``, computed at each scrape.

    Absent until the engine runs: a pod that is still loading has no capacity
    yet, and a zero would pull an autoscaler's average down.
    """

    def __init__(self, max_streams: MaxStreams, engine: Callable[[], StreamEngine | None],
                 live: Callable[[], int]) -> None:
        self._max_streams = max_streams
        self._engine = engine
        self._live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self._engine()
        if engine is None or not engine.running:
            return
        yield GaugeMetricFamily(
            CAPACITY_STREAMS,
            'Streams this daemon admits now (max_streams, or the engine\'s measured capacity with "auto")',
            value=stream_limit(self._max_streams, engine),
        )
        yield GaugeMetricFamily(
            CAPACITY_IN_USE,
            "Share of the capacity in use (above 1: overloaded); what a HorizontalPodAutoscaler scales on",
            value=capacity_in_use(self._max_streams, engine, self._live()),
        )
