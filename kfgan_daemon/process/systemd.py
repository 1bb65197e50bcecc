"""sd_notify(3) for every mode run as a systemd service: readiness, status lines, the watchdog."""
from __future__ import annotations

import asyncio
import os


class SystemdNotifier:
    """sd_notify(3) over ``$NOTIFY_SOCKET``; does nothing when the process is not run by systemd."""

    def __init__(self) -> None:
        self._notifier = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
            if self._notifier.socket is not None:
                # Called from the event loop: a notification the manager is too busy
                # to take is dropped (sdnotify swallows the error), never waited for.
                self._notifier.socket.setblocking(False)

    @property
    def active(self) -> bool:
        return self._notifier is not None

    def notify(self, state: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(state)

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half of ``$WATCHDOG_USEC`` in seconds when systemd expects pings from this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def start_watchdog(self) -> asyncio.Task[None] | None:
        """Ping systemd from the event loop at half its interval, so that a stuck loop gets the unit
        restarted; None when no watchdog is configured."""
        interval = self.watchdog_interval()
        if interval is None or not self.active:
            return None
        return asyncio.get_running_loop().create_task(self._ping(interval), name="kfgan-watchdog")

    async def _ping(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
