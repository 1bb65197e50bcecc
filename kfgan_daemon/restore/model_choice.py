"""Which generator a command uses when the user names none, and how it is opened."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from kfgan_daemon.errors import ModelError
from kfgan_daemon.restore.generator import CropGenerator

LITE_MODEL_NAME = "kfgan-lite.safetensors"
MODEL_ENV = "KFGAN_MODEL"


def default_model_candidates() -> list[Path]:
    """Where the shipped lite model may live: a source checkout, then an installed data directory."""
    package_root = Path(__file__).resolve().parents[2]
    return [
        package_root / "models" / LITE_MODEL_NAME,
        Path(sys.prefix) / "share" / "kfgan-daemon" / "models" / LITE_MODEL_NAME,
    ]


def resolve_model_path(checkpoint: str | Path | None) -> Path:
    """The explicit checkpoint, else $KFGAN_MODEL, else the shipped lite model."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ModelError(
                f"checkpoint {path} does not exist; pass the published net_g_55000.pth (see models/README.md) "
                f"or one of ours (.safetensors)"
            )
        return path
    from_env = os.environ.get(MODEL_ENV)
    if from_env:
        return resolve_model_path(from_env)
    for candidate in default_model_candidates():
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(p) for p in default_model_candidates())
    raise ModelError(
        f"no model found (looked for {searched}); pass --checkpoint PATH (the published net_g_55000.pth "
        f"or a model trained with `kfgan-daemon train`), or reinstall the project so that models/{LITE_MODEL_NAME} ships with it"
    )


def open_generator(
    checkpoint: str | Path | None = None,
    variant: str | None = None,
    device: str = "cpu",
    half: bool = False,
) -> CropGenerator:
    from kfgan_daemon.model import load_generator

    path = resolve_model_path(checkpoint)
    module = load_generator(path, variant=variant, device=device)
    return CropGenerator(module, device=device, half=half)
