"""Prometheus metrics of ``kfgan-daemon janus``, by room and publisher.

The engine's own metrics (frames restored, carried forward, shed; latency) are
in the same registry, labelled by stream id ``janus-<room>-<publisher>``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kfgan_daemon.janus.feed import RestoredFeed

# What the daemon does with a publisher of a watched room.
PUBLISHER_STATES = ("restored", "waiting_for_capacity", "unsupported_codec")


class JanusMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.connected = Gauge("kfgan_janus_connected", "1 while the daemon has a session with Janus",
                               registry=self.registry)
        self.reconnects = Counter("kfgan_janus_reconnects_total",
                                  "Sessions rebuilt after Janus went away or restarted", registry=self.registry)
        self.publishers = Gauge("kfgan_janus_publishers", "Publishers of video in the watched rooms, by what the "
                                "daemon does with them", ["room", "state"], registry=self.registry)
        self.feed_errors = Counter("kfgan_janus_feed_errors_total", "Restored feeds that failed to start or ended "
                                   "with an error", ["room"], registry=self.registry)

    def count_publishers(self, room: int, states: Iterable[str]) -> None:
        counts = dict.fromkeys(PUBLISHER_STATES, 0)
        for state in states:
            counts[state] += 1
        for state, count in counts.items():
            self.publishers.labels(str(room), state).set(count)


class FeedCollector(Collector):
    """Per-feed counters read from the live feeds at scrape time (a feed's counts end with it)."""

    def __init__(self, feeds: Callable[[], Iterable["RestoredFeed"]]) -> None:
        self._feeds = feeds

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["room", "publisher"]
        sent = CounterMetricFamily("kfgan_janus_feed_frames_sent", "Restored frames sent back into the room", labels=labels)
        asked = CounterMetricFamily("kfgan_janus_feed_keyframes_asked", "PLIs sent to the publisher for the keyframe "
                                    "store", labels=labels)
        given = CounterMetricFamily("kfgan_janus_feed_keyframes_given", "IDRs sent because a subscriber asked",
                                    labels=labels)
        packets = CounterMetricFamily("kfgan_janus_feed_rtp_packets", "RTP packets received from the forwarder",
                                      labels=labels)
        malformed = CounterMetricFamily("kfgan_janus_feed_rtp_malformed", "Malformed RTP packets counted and skipped",
                                        labels=labels)
        for feed in self._feeds():
            key = [str(feed.room.room), str(feed.publisher.id)]
            asked.add_metric(key, feed.counts.keyframes_asked)
            given.add_metric(key, feed.counts.keyframes_given)
            if feed.pipe is not None:
                sent.add_metric(key, feed.pipe.frames_sent)
                stats = feed.pipe.receiver.stats
                packets.add_metric(key, stats.packets_received)
                malformed.add_metric(key, stats.packets_malformed)
        yield from (sent, asked, given, packets, malformed)
