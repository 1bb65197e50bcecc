"""`kfgan-daemon doctor`: is everything the daemon needs present on this machine?"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    required: bool = True

    def render(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        return f"[{mark}] {self.name}: {self.detail}"


def _check(name: str, fn: Callable[[], str], required: bool = True) -> CheckResult:
    try:
        return CheckResult(name, True, fn(), required)
    except Exception as exc:  # doctor reports every failure instead of stopping at the first
        return CheckResult(name, False, f"{type(exc).__name__}: {exc}", required)


def _torch() -> str:
    import torch

    cuda = torch.cuda.is_available()
    devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA devices: {devices}"


def _codecs() -> str:
    import av

    needed = {"libx264": "encoder", "h264": "decoder", "libvpx": "encoder", "vp8": "decoder"}
    missing = [name for name in needed if name not in av.codecs_available]
    if missing:
        raise RuntimeError(f"PyAV's FFmpeg lacks {', '.join(missing)}")
    return f"PyAV {av.__version__}: " + ", ".join(f"{n} ({k})" for n, k in needed.items())


def _face_models() -> str:
    from kfgan_daemon.face import locate_dlib_model

    paths = [locate_dlib_model(name) for name in ("shape_predictor_68_face_landmarks.dat", "mmod_human_face_detector.dat")]
    return ", ".join(str(p) for p in paths)


def _model(checkpoint: Path | None, variant: str | None) -> Callable[[], str]:
    def check() -> str:
        from kfgan_daemon.restore.model_choice import open_generator, resolve_model_path

        path = resolve_model_path(checkpoint)
        generator = open_generator(path, variant=variant)
        generator.warm_up()
        params = sum(p.numel() for p in generator.module.parameters())
        return f"{path} ({type(generator.module).__name__}, {params / 1e6:.2f}M parameters) runs"

    return check


def _optional_module(module: str, purpose: str) -> Callable[[], str]:
    def check() -> str:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"{module} not installed ({purpose})")
        return f"{module} available ({purpose})"

    return check


def run_checks(checkpoint: Path | None = None, variant: str | None = None) -> list[CheckResult]:
    return [
        _check("torch", _torch),
        _check("codecs", _codecs),
        _check("dlib face models", _face_models),
        _check("generator", _model(checkpoint, variant)),
        _check("uvloop", _optional_module("uvloop", "faster event loop"), required=False),
        _check("pyvirtualcam", _optional_module("pyvirtualcam", "virtual camera output, extra [vcam]"), required=False),
    ]
