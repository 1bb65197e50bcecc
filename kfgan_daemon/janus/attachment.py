"""``kfgan-daemon janus``: restore every video publisher of some Janus VideoRooms, as a daemon mode.

A mode of :class:`~kfgan_daemon.process.DaemonProcess` (the same start-up,
warm-up, drain and shutdown as ``serve`` and ``pipe``). It follows each
room's publishers through a passive participant
(:class:`~kfgan_daemon.janus.videoroom.RoomWatcher`) and, every
``poll_interval``, makes the feeds match them: a new H.264 publisher gets a
:class:`~kfgan_daemon.janus.feed.RestoredFeed` while the engine has capacity
(``max_streams``, "auto" by default: what it measures it can serve); one more
waits unrestored, reported, until a place frees; a publisher of another codec
is passed over and reported; one that leaves takes its feed with it. When
Janus goes away or restarts, the feeds are dropped (Janus dropped its side),
the daemon reconnects every ``reconnect_interval`` and rebuilds them. On
SIGTERM every forwarder and remote publisher the daemon made is removed before
it exits.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from kfgan_daemon.engine.heap import HeapReleaser
from kfgan_daemon.errors import ConfigError, KfganError
from kfgan_daemon.janus.api import JanusClient, JanusError, JanusSession, JanusSessionLost, JanusUnreachable
from kfgan_daemon.janus.config import JanusSettings
from kfgan_daemon.janus.feed import RestoredFeed
from kfgan_daemon.janus.metrics import FeedCollector, JanusMetrics
from kfgan_daemon.janus.status import create_status_app
from kfgan_daemon.janus.videoroom import Publisher, RoomWatcher, VideoRoom
from kfgan_daemon.process import DaemonProcess, Runtime
from kfgan_daemon.rtpapps.pipe import PipeOptions
from kfgan_daemon.service.capacity import stream_limit
from kfgan_daemon.service.config import Settings
from kfgan_daemon.service.server import engine_settings, open_configured_generator, start_http

log = logging.getLogger(__name__)

# What subscribers of a conference all decode (Janus offers the restored feed as constrained baseline).
RESTORED_PROFILE = "baseline"
FeedKey = tuple[int, int]  # (room, publisher id)


class JanusMode:
    """The Janus attachment (see the module's docstring); ``settings.janus`` says which server and rooms."""

    name = "janus"

    def __init__(self, settings: Settings) -> None:
        if settings.janus is None:
            raise ConfigError("janus: the config has no [janus] table (url, rooms); see the README's Janus section")
        self.settings = settings
        self.janus: JanusSettings = settings.janus
        self.metrics = JanusMetrics()
        self.registry = self.metrics.registry
        self.feeds: dict[FeedKey, RestoredFeed] = {}
        self.metrics.registry.register(FeedCollector(lambda: list(self.feeds.values())))
        self.states: dict[FeedKey, str] = {}  # every watched video publisher: restored, waiting..., unsupported...
        self.status = "loading"
        self.url: str | None = None
        self._client: JanusClient | None = None
        self._session: JanusSession | None = None
        self._janus_host = "127.0.0.1"
        self._rooms: dict[int, VideoRoom] = {}
        self._watchers: dict[int, RoomWatcher] = {}
        self._runtime: Runtime | None = None
        self._busy = asyncio.Lock()  # one change of the feeds at a time: the follow loop's, or the drain's
        self._draining = False
        self._heap = HeapReleaser()
        self._http = web.AppRunner(
            create_status_app(lambda: self.status, self.describe, self.registry, settings.token),
            handle_signals=False, access_log=None, shutdown_timeout=1.0,
        )

    # -- the phases -----------------------------------------------------------------

    async def prepare(self) -> None:
        """Answer health checks, then reach Janus and the rooms: a wrong URL, secret or room fails start-up here."""
        self.url = await start_http(self._http, self.settings)
        await self._connect()

    async def start(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.status = "ready"

    async def run(self) -> None:
        """Follow the rooms; when Janus goes away, reconnect and rebuild, for as long as the process runs."""
        while True:
            try:
                await self._follow()
            except (JanusSessionLost, JanusUnreachable) as exc:
                log.warning("janus: lost Janus at %s (%s); reconnecting every %.1f s", self.janus.url, exc,
                            self.janus.reconnect_interval)
                self.status = "reconnecting"
                self.metrics.connected.set(0)
                async with self._busy:
                    await self._drop_feeds(remove=False)
                await self._disconnect()
                await self._reconnect()
                self.metrics.reconnects.inc()
                self.status = "ready"

    async def drain(self) -> None:
        """Stop following; let each feed's last frames out and withdraw it from its room."""
        async with self._busy:
            self._draining = True
            self.status = "draining"
            await asyncio.gather(*(feed.finish() for feed in self.feeds.values()), return_exceptions=True)

    async def close(self) -> None:
        """Remove everything the daemon made in Janus (when it is still there), leave the rooms, stop answering."""
        self._draining = True
        self.status = "draining"
        await self._drop_feeds(remove=self._session is not None and self._session.lost is None)
        await self._disconnect()
        await self._heap.close()
        await self._http.cleanup()

    def ready_status(self) -> str:
        return f"restoring the publishers of room(s) {', '.join(map(str, self.janus.rooms))} at {self.janus.url}"

    def describe(self) -> dict[str, Any]:
        """``/publishers``: every watched video publisher, its state, and its feed's counts when restored."""
        rooms: dict[str, list[dict[str, Any]]] = {str(room): [] for room in self.janus.rooms}
        for (room, publisher_id), state in sorted(self.states.items()):
            feed = self.feeds.get((room, publisher_id))
            entry: dict[str, Any] = {"publisher": publisher_id, "state": state}
            if feed is not None:
                entry.update(feed.describe())
            rooms.setdefault(str(room), []).append(entry)
        return {"status": self.status, "janus": self.janus.url, "rooms": rooms}

    # -- following the rooms ------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            async with self._busy:
                if self._draining:
                    return
                for room_id in self.janus.rooms:
                    await self._reconcile(room_id)
            assert self._session is not None
            if self._session.lost is not None:
                raise self._session.lost
            await asyncio.sleep(self.janus.poll_interval)

    async def _reconcile(self, room_id: int) -> None:
        """Make the room's feeds match its publishers, within the engine's capacity."""
        room, watcher = self._rooms[room_id], self._watchers[room_id]
        watcher.poll()
        wanted = {pid: p for pid, p in watcher.publishers.items() if not room.is_own(p) and p.video is not None}
        for key in [key for key in self.feeds if key[0] == room_id]:
            feed = self.feeds[key]
            if key[1] not in wanted:
                log.info("janus: %r (publisher %d) left room %d; withdrawing %r", feed.publisher.display, key[1],
                         room_id, feed.display)
                await self._drop_feed(key, remove=True)
            elif feed.task is not None and feed.task.done():
                error = feed.task.exception() if not feed.task.cancelled() else None
                log.error("janus: the feed of %r (room %d) ended%s; starting it again", feed.publisher.display,
                          room_id, f": {error!r}" if error else "")
                self.metrics.feed_errors.labels(str(room_id)).inc()
                await self._drop_feed(key, remove=True)
        for key in [key for key in self.states if key[0] == room_id and key[1] not in wanted]:
            del self.states[key]
        for publisher_id, publisher in wanted.items():
            key = (room_id, publisher_id)
            if key in self.feeds:
                continue
            if publisher.video is None or publisher.video.codec != "h264":
                self._report(key, publisher, "unsupported_codec",
                             f"its video is {publisher.video.codec if publisher.video else 'absent'}; only H.264 "
                             "is restored")
                continue
            if len(self.feeds) >= self._capacity():
                self._report(key, publisher, "waiting_for_capacity",
                             f"the engine serves {len(self.feeds)} feed(s), its capacity; it stays unrestored until "
                             "a place frees")
                continue
            await self._start_feed(room, key, publisher)
        self.metrics.count_publishers(room_id, (state for (room, _), state in self.states.items() if room == room_id))

    async def _start_feed(self, room: VideoRoom, key: FeedKey, publisher: Publisher) -> None:
        assert self._runtime is not None
        feed = RestoredFeed(
            room, publisher, self._pipe_options(),
            forward_host=self.janus.forward_host, publish_iface=self.janus.publish_iface, janus_host=self._janus_host,
            keyframe_interval=self.settings.pli_interval, restore_settings=self.settings.restore_settings(),
        )
        try:
            await feed.open(self._runtime.engine)
        except JanusSessionLost:
            raise
        except (KfganError, OSError) as exc:
            log.error("janus: cannot restore %r (publisher %d, room %d): %s", publisher.display, publisher.id,
                      room.room, exc)
            self.metrics.feed_errors.labels(str(room.room)).inc()
            return
        self.feeds[key] = feed
        self.states[key] = "restored"

    def _report(self, key: FeedKey, publisher: Publisher, state: str, why: str) -> None:
        if self.states.get(key) != state:
            log.warning("janus: %r (publisher %d, room %d) is not restored: %s", publisher.display, publisher.id,
                        key[0], why)
        self.states[key] = state

    def _capacity(self) -> int:
        assert self._runtime is not None
        return stream_limit(self.settings.max_streams, self._runtime.engine)

    def _pipe_options(self) -> PipeOptions:
        return PipeOptions(policy=self.settings.overload_policy, output_profile=RESTORED_PROFILE)

    async def _drop_feed(self, key: FeedKey, remove: bool) -> None:
        feed = self.feeds.pop(key)
        self.states.pop(key, None)
        await feed.close(remove=remove)
        # A feed's decoder, encoder and face models' buffers are freed now, but their cycles wait for a
        # full collection and glibc keeps the pages: without this, every publisher who came and went
        # would leave its hundred megabytes behind.
        self._heap.schedule()

    async def _drop_feeds(self, remove: bool) -> None:
        for key in list(self.feeds):
            await self._drop_feed(key, remove)

    # -- the connection ---------------------------------------------------------------------

    async def _connect(self) -> None:
        """A session, one handle per room and a watcher in each; raises what names the problem."""
        janus = self.janus
        self._client = JanusClient(
            janus.url,
            api_secret=janus.api_secret.get_secret_value() if janus.api_secret else None,
            token=janus.token.get_secret_value() if janus.token else None,
        )
        secret = janus.room_secret.get_secret_value() if janus.room_secret else None
        self._janus_host = await _resolve(urlsplit(janus.url).hostname or "127.0.0.1")
        self._session = await self._client.create_session()
        for room_id in janus.rooms:
            self._rooms[room_id] = await VideoRoom.open(self._session, room_id, secret=secret,
                                                        restored_suffix=janus.restored_suffix)
            self._watchers[room_id] = await RoomWatcher.join(self._session, room_id)
        self.metrics.connected.set(1)
        log.info("janus: connected to %s (session %d), watching room(s) %s", janus.url, self._session.id,
                 ", ".join(map(str, janus.rooms)))

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.janus.reconnect_interval)
            try:
                await self._connect()
                return
            except JanusError as exc:
                log.info("janus: not back yet: %s", exc)
                await self._disconnect()

    async def _disconnect(self) -> None:
        """Leave the rooms and end the session, as far as Janus is still there; forget them either way."""
        session, client = self._session, self._client
        watchers, rooms = list(self._watchers.values()), list(self._rooms.values())
        self._session = self._client = None
        self._watchers, self._rooms = {}, {}
        if session is not None and session.lost is None:
            for part in (*watchers, *rooms):
                try:
                    await (part.leave() if isinstance(part, RoomWatcher) else part.close())
                except JanusError as exc:
                    log.debug("janus: leaving: %s", exc)
        if session is not None:
            await session.destroy()
        if client is not None:
            await client.close()
        self.metrics.connected.set(0)


async def _resolve(host: str) -> str:
    """The Janus host's address, where the daemon's RTCP goes (a name would be looked up on every packet)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    return infos[0][4][0] if infos else host


async def run_janus(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    generator_factory: Callable[[Settings], object] = open_configured_generator,
    handle_signals: bool = True,
) -> None:
    """Attach to Janus until ``stop`` is set or SIGTERM/SIGINT arrives, then withdraw and return.

    Raises :class:`~kfgan_daemon.errors.ConfigError` without a ``[janus]`` table,
    :class:`~kfgan_daemon.janus.api.JanusError` (unreachable, wrong secret, no
    such room) when start-up cannot reach what the settings name.
    """
    mode = JanusMode(settings)
    await DaemonProcess(
        mode,
        load=lambda: generator_factory(settings),
        engine_settings=engine_settings(settings),
        restore_settings=settings.restore_settings(),
        registry=mode.registry,
        warm=settings.warmup,
        watchdog=settings.watchdog,
        handle_signals=handle_signals,
        stop=stop,
    ).serve()
