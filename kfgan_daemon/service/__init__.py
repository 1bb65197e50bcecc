"""The service: settings, the HTTP control plane (WebRTC signalling, health, metrics, stream admin) and its lifecycle.

``kfgan-daemon serve`` is ``serve(Settings.load(config, host=..., port=...))``.
"""
from kfgan_daemon.service.app import ServiceState, create_app
from kfgan_daemon.service.config import Settings
from kfgan_daemon.service.server import run_server, serve

__all__ = ["ServiceState", "Settings", "create_app", "run_server", "serve"]
