"""The Janus API over its HTTP transport: sessions, plugin handles, transactions and long-poll events.

One :class:`JanusClient` per server holds the aiohttp session. A
:class:`JanusSession` keeps itself alive (a keepalive task) and reads its events
with one long poll, handing each to the request that waits for it (matched by
transaction) or to its handle's event queue. When Janus forgets the session (a
restart, a timeout) or stops answering, every waiter gets
:class:`JanusSessionLost`, so the caller knows to start a new session.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import aiohttp

from kfgan_daemon.errors import KfganError

log = logging.getLogger(__name__)

# Janus core error codes (janus/apierror.h) the client tells apart.
UNAUTHORIZED = 403
SESSION_NOT_FOUND = 458

# Events a handle keeps for its reader; a handle nobody reads must not grow without end.
_HANDLE_QUEUE_SIZE = 256


class JanusError(KfganError):
    """Janus answered a request with an error; ``code`` and ``reason`` are Janus's own."""

    def __init__(self, message: str, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class JanusUnreachable(JanusError, ConnectionError):
    """No Janus API answers at the URL (wrong URL, server down or not yet started)."""


class JanusAuthError(JanusError, PermissionError):
    """Janus refused the API secret or token."""


class JanusSessionLost(JanusError, ConnectionError):
    """The session is gone (Janus restarted, the session timed out, or the server went away): open a new one."""


class JanusPluginError(JanusError):
    """A plugin refused a request; ``code`` is the plugin's ``error_code``."""


@dataclass(frozen=True, slots=True)
class PluginReply:
    """What a plugin answered: its ``data`` and the JSEP (SDP offer or answer) that came with it, if any."""

    data: dict[str, Any]
    jsep: dict[str, Any] | None = None


def _transaction() -> str:
    return secrets.token_hex(6)


class JanusClient:
    """The HTTP transport to one Janus server; ``api_secret`` and ``token`` go into every request."""

    def __init__(
        self,
        url: str,
        api_secret: str | None = None,
        token: str | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._auth = {k: v for k, v in (("apisecret", api_secret), ("token", token)) if v}
        self.request_timeout = request_timeout
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "JanusClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def info(self) -> dict[str, Any]:
        """Janus's ``server_info``: a health check that needs no session and no secret."""
        return await self._call("GET", self.url + "/info", None, self.request_timeout)

    async def create_session(self, keepalive_interval: float = 25.0) -> "JanusSession":
        """A new session, kept alive and read by its own tasks until :meth:`JanusSession.destroy`."""
        reply = await self.post("", {"janus": "create"})
        session = JanusSession(self, reply["data"]["id"], keepalive_interval)
        session.start()
        return session

    async def post(self, path: str, message: dict[str, Any], session: "JanusSession | None" = None) -> dict[str, Any]:
        """One request; an ``error`` reply raises the matching :class:`JanusError`."""
        body = {**message, "transaction": message.get("transaction") or _transaction(), **self._auth}
        return await self._call("POST", self.url + path, body, self.request_timeout, session)

    async def poll(self, session: "JanusSession", timeout: float) -> list[dict[str, Any]]:
        """Waits for the session's next events (Janus answers a keepalive after about 30 s of none)."""
        params = {"maxev": "10", **self._auth}
        reply = await self._call("GET", f"{self.url}/{session.id}", None, timeout, session, params)
        return reply if isinstance(reply, list) else [reply]

    async def _call(
        self,
        method: str,
        url: str,
        body: dict[str, Any] | None,
        timeout: float,
        session: "JanusSession | None" = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        try:
            async with self.http.request(
                method, url, json=body, params=params, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                if response.status == 404 and session is not None:
                    raise JanusSessionLost(f"Janus at {self.url} no longer knows session {session.id}")
                if response.status != 200:
                    raise JanusUnreachable(f"no Janus API at {self.url} (HTTP {response.status} for {url})")
                reply = await response.json(content_type=None)
        except aiohttp.ClientError as error:
            if session is not None:
                raise JanusSessionLost(f"lost Janus at {self.url} during session {session.id}: {error}") from error
            raise JanusUnreachable(f"cannot reach Janus at {self.url}: {error}") from error
        except asyncio.TimeoutError as error:
            if session is not None:
                raise JanusSessionLost(f"Janus at {self.url} did not answer within {timeout:.0f} s") from error
            raise JanusUnreachable(f"Janus at {self.url} did not answer within {timeout:.0f} s") from error
        if isinstance(reply, dict) and reply.get("janus") == "error":
            raise _core_error(self.url, reply["error"], session)
        return reply


def _core_error(url: str, error: dict[str, Any], session: "JanusSession | None") -> JanusError:
    code, reason = error.get("code"), error.get("reason", "")
    if code == UNAUTHORIZED:
        return JanusAuthError(f"Janus at {url} refused the API secret or token: {reason}", code, reason)
    if code == SESSION_NOT_FOUND and session is not None:
        return JanusSessionLost(f"Janus at {url} no longer knows session {session.id}: {reason}", code, reason)
    return JanusError(f"Janus at {url} answered error {code}: {reason}", code, reason)


class JanusSession:
    """A Janus session: keeps itself alive, reads its events, and routes them to waiters and handles."""

    def __init__(self, client: JanusClient, session_id: int, keepalive_interval: float) -> None:
        self.client = client
        self.id = session_id
        self.keepalive_interval = keepalive_interval
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._handles: dict[int, JanusHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.lost: JanusSessionLost | None = None
        self.closed = asyncio.Event()
        self._closing = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_events(), name=f"janus-events-{self.id}"),
            asyncio.create_task(self._keep_alive(), name=f"janus-keepalive-{self.id}"),
        ]

    async def attach(self, plugin: str) -> "JanusHandle":
        reply = await self.post("", {"janus": "attach", "plugin": plugin})
        handle = JanusHandle(self, reply["data"]["id"], plugin)
        self._handles[handle.id] = handle
        return handle

    async def post(self, path: str, message: dict[str, Any]) -> dict[str, Any]:
        """A request on this session; raises the loss it already saw rather than asking a dead session."""
        if self.lost is not None:
            raise self.lost
        try:
            return await self.client.post(f"/{self.id}{path}", message, self)
        except JanusSessionLost as error:
            self._lose(error)
            raise

    async def transact(self, path: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """A request whose answer may come later as an event with the same transaction (``ack`` first)."""
        transaction = _transaction()
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # Registered before posting: the long poll may deliver the event before the ack returns.
        self._waiters[transaction] = waiter
        try:
            reply = await self.post(path, {**message, "transaction": transaction})
            if reply.get("janus") != "ack":
                return reply
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError as error:
            what = message.get("body", message)
            raise JanusError(f"Janus at {self.client.url} sent no answer to {what} within {timeout:.0f} s") from error
        finally:
            self._waiters.pop(transaction, None)

    async def destroy(self) -> None:
        """Ends the session on Janus (when it is still there) and stops its tasks."""
        # The long poll ends with a 404 once Janus drops the session: that is no loss to report.
        self._closing = True
        if self.lost is None:
            try:
                await self.client.post(f"/{self.id}", {"janus": "destroy"}, self)
            except JanusError as error:
                log.debug("destroying Janus session %s: %s", self.id, error)
        await self._stop_tasks()
        self.closed.set()

    async def _stop_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _lose(self, error: JanusSessionLost) -> None:
        if self.lost is not None:
            return
        log.warning("%s", error)
        self.lost = error
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(error)
        for handle in self._handles.values():
            handle._deliver_loss(error)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.closed.set()

    async def _read_events(self) -> None:
        try:
            while True:
                try:
                    events = await self.client.poll(self, timeout=self.client.request_timeout + 40.0)
                except JanusSessionLost as error:
                    if not self._closing:
                        self._lose(error)
                    return
                for event in events:
                    self._route(event)
        except asyncio.CancelledError:
            pass

    def _route(self, event: dict[str, Any]) -> None:
        if event.get("janus") == "keepalive":
            return
        waiter = self._waiters.get(event.get("transaction", ""))
        if waiter is not None and not waiter.done():
            waiter.set_result(event)
            return
        handle = self._handles.get(event.get("sender", 0))
        if handle is not None:
            handle._deliver(event)
        else:
            log.debug("Janus event for no handle of session %s: %s", self.id, event)

    async def _keep_alive(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.keepalive_interval)
                try:
                    await self.post("", {"janus": "keepalive"})
                except JanusSessionLost:
                    return
                except JanusError as error:
                    log.warning("keepalive of Janus session %s failed: %s", self.id, error)
        except asyncio.CancelledError:
            pass

    def _forget(self, handle: "JanusHandle") -> None:
        self._handles.pop(handle.id, None)


class JanusHandle:
    """A plugin handle: synchronous requests, asynchronous messages, and the events nobody asked for."""

    def __init__(self, session: JanusSession, handle_id: int, plugin: str) -> None:
        self.session = session
        self.id = handle_id
        self.plugin = plugin
        self._events: asyncio.Queue[dict[str, Any] | JanusSessionLost] = asyncio.Queue(_HANDLE_QUEUE_SIZE)

    async def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """A synchronous plugin request (``listparticipants``, ``rtp_forward``...): the plugin's data."""
        reply = await self.session.post(f"/{self.id}", {"janus": "message", "body": body})
        return self._plugin_reply(reply, body).data

    async def message(
        self, body: dict[str, Any], jsep: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> PluginReply:
        """An asynchronous plugin request (``join``, ``publish``, ``start``...): waits for its event."""
        message: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            message["jsep"] = jsep
        reply = await self.session.transact(f"/{self.id}", message, timeout)
        return self._plugin_reply(reply, body)

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event not tied to a request (plugin events, ``webrtcup``, ``hangup``...)."""
        event = await asyncio.wait_for(self._events.get(), timeout)
        if isinstance(event, JanusSessionLost):
            self._events.put_nowait(event)  # every later reader learns it too
            raise event
        return event

    def pending_events(self) -> list[dict[str, Any]]:
        """The events already received, without waiting: for callers that look now and then instead of reading."""
        events: list[dict[str, Any]] = []
        while not self._events.empty():
            event = self._events.get_nowait()
            if isinstance(event, JanusSessionLost):
                self._events.put_nowait(event)
                raise event
            events.append(event)
        return events

    async def detach(self) -> None:
        self.session._forget(self)
        if self.session.lost is None:
            await self.session.post(f"/{self.id}", {"janus": "detach"})

    def _plugin_reply(self, reply: dict[str, Any], body: dict[str, Any]) -> PluginReply:
        data = reply.get("plugindata", {}).get("data", {})
        if "error_code" in data or "error" in data:
            code, reason = data.get("error_code"), data.get("error", "")
            message = f"{self.plugin} refused {body.get('request')!r}: {reason} (error {code})"
            raise JanusPluginError(message, code, reason)
        return PluginReply(data, reply.get("jsep"))

    def _deliver(self, event: dict[str, Any]) -> None:
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self._events.get_nowait()
            self._events.put_nowait(event)
            log.warning("events of Janus handle %s are not being read; dropped the oldest", self.id)

    def _deliver_loss(self, error: JanusSessionLost) -> None:
        if self._events.full():
            self._events.get_nowait()
        self._events.put_nowait(error)
