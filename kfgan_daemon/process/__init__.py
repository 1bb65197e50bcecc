"""The daemon's process lifecycle, shared by every mode (``serve``, ``pipe``, ``bench --live``, ``janus``).

    from kfgan_daemon.process import DaemonProcess
    await DaemonProcess(mode, generator, engine_settings=..., restore_settings=...).serve()

Modules: ``lifecycle`` (the phases and the :class:`Mode` protocol), ``signals``
(SIGINT and SIGTERM as a stop request), ``systemd`` (sd_notify and the watchdog).
"""
from kfgan_daemon.process.lifecycle import CLEANUP_TIMEOUT, DaemonProcess, Mode, Runtime, bounded
from kfgan_daemon.process.signals import stop_on_signals
from kfgan_daemon.process.systemd import SystemdNotifier

__all__ = ["CLEANUP_TIMEOUT", "DaemonProcess", "Mode", "Runtime", "SystemdNotifier", "bounded", "stop_on_signals"]
