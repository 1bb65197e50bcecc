"""Training: dataset building from real videos, losses, the training loop.

Entry points for the CLI: :func:`build_dataset` (``kfgan-daemon dataset build``) and
:func:`train` (``kfgan-daemon train --config FILE``).
"""
from kfgan_daemon.train.config import TrainConfig, load_config
from kfgan_daemon.train.dataset import DatasetManifest, build_dataset
from kfgan_daemon.train.trainer import TrainResult, Trainer, export_checkpoint, train

__all__ = [
    "DatasetManifest",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_dataset",
    "export_checkpoint",
    "load_config",
    "train",
]
