"""Per-stream restoration: the synchronous composition of face, keyframe and model steps."""
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.stream import RestoreStats, StreamRestorer
from kfgan_daemon.restore.timing import StageTimer

__all__ = ["CropGenerator", "FaceJob", "RestoreSettings", "RestoreStats", "StageTimer", "StreamRestorer"]
