"""Training configuration: a TOML file validated by pydantic, every error naming its field."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.face.reference_flow import ReferenceFlow


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSettings(_Section):
    dir: Path = Path("runs/lite")  # checkpoints, metrics.jsonl, exported weights
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:N"
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads; None keeps torch's default
    # Processes that make training batches ahead of the steps (0: the training process makes each).
    loader_workers: int = Field(default=0, ge=0)


class DatasetSettings(_Section):
    """How ``kfgan-daemon dataset build --config FILE`` makes ``data.dir`` (see train/dataset.py)."""

    videos: Path = Path("../shared/media")
    crfs: list[int] = Field(default_factory=lambda: [42], min_length=1)
    # Senders of kfgan_daemon.media.encode.SENDERS: "stream" (plain x264), "hq" (fine I-frames).
    senders: list[Literal["stream", "hq"]] = Field(default_factory=lambda: ["stream"], min_length=1)
    keyint_seconds: float = Field(default=1.0, gt=0)
    sample_every: int = Field(default=5, ge=1)
    sample_offset: int = Field(default=5, ge=0)
    max_frames: int | None = Field(default=None, ge=1)  # per video: more people beat longer clips
    preset: str = "medium"
    # Who appears in more than one video (person -> videos); anyone else is their video's own person.
    persons: dict[str, list[str]] = Field(default_factory=dict)
    validation: list[str] = Field(default_factory=list)  # persons that choose the checkpoint
    test: list[str] = Field(default_factory=list)  # persons held out for `kfgan-daemon eval`, never built
    workers: int = Field(default=1, ge=1)


class DataSettings(_Section):
    dir: Path = Path("data/lite-crf42-hq")
    patch_size: int = Field(default=256, ge=16, le=256, multiple_of=16)
    # Training draws each sample with one of these references ("hq": the original I-frame,
    # "stream": the decoded one); validation reports each mode and chooses on their mean.
    reference_modes: list[Literal["hq", "stream"]] = Field(default_factory=lambda: ["hq"], min_length=1)
    # Refine each warped keyframe along the optical flow from the compressed crop
    # (kfgan_daemon.face.reference_flow); the exported model records it, and the restorer does the same.
    reference_flow: ReferenceFlow | None = None
    # hq samples on an I-frame have the target itself as reference: only copying to learn.
    exclude_self_reference: bool = True
    # Adds, for every sample on an I-frame, one whose input is the original crop (a good
    # frame, as a high-quality I-frame arrives): the model must leave it as it is.
    clean_keyframes: bool = False
    shift: int = Field(default=16, ge=0, le=64)
    rotate: bool = True
    cutout_probability: float = Field(default=0.3, ge=0.0, le=1.0)
    cutout_size: int = Field(default=64, ge=0, le=256)


class ModelSettings(_Section):
    variant: Literal["lite", "guided", "full"] = "lite"
    config: dict[str, Any] = Field(default_factory=dict)  # generator constructor keywords
    # Weights to start from (published .pth or our .safetensors). A generator of the same
    # variant with fewer residual blocks grows into this one: the extra blocks start as identity.
    init: Path | None = None


class LossSettings(_Section):
    """Weights of each term; 0 switches a term (and whatever it needs) off."""

    mse: float = Field(default=0.0, ge=0)
    charbonnier: float = Field(default=0.0, ge=0)
    ssim: float = Field(default=0.0, ge=0)
    gradient: float = Field(default=0.0, ge=0)
    perceptual: float = Field(default=0.0, ge=0)
    style: float = Field(default=0.0, ge=0)
    adversarial: float = Field(default=0.0, ge=0)
    discriminator_scale_weights: list[float] = Field(default_factory=lambda: [4.0, 2.0, 1.0, 1.0])
    vgg_weights: Path | None = None  # torchvision vgg19-dcbb9e9d.pth, needed by perceptual and style

    @model_validator(mode="after")
    def _some_term(self) -> "LossSettings":
        if not any((self.mse, self.charbonnier, self.ssim, self.gradient, self.perceptual, self.style)):
            raise ValueError("at least one reconstruction loss weight (mse, charbonnier, ssim, gradient, perceptual, style) must be > 0")
        return self

    @property
    def needs_vgg(self) -> bool:
        return self.perceptual > 0 or self.style > 0


class OptimSettings(_Section):
    lr: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    discriminator_lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=4, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    # Step decay: lr is multiplied by lr_decay at each milestone step.
    milestones: list[int] = Field(default_factory=list)
    lr_decay: float = Field(default=0.5, gt=0, le=1)
    # Decay of an exponential moving average of the generator's weights (e.g. 0.999); when
    # set, validation, the best checkpoint and the export use the average, not the last step.
    ema: float | None = Field(default=None, gt=0, lt=1)


class ScheduleSettings(_Section):
    max_steps: int = Field(default=100_000, ge=1)
    log_every: int = Field(default=20, ge=1)
    validate_every: int = Field(default=500, ge=1)
    validation_samples: int | None = Field(default=None, ge=1)  # None: the whole split
    checkpoint_minutes: float = Field(default=5.0, gt=0)
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)


class ExportSettings(_Section):
    best: Path | None = None  # where the best (validation PSNR) generator goes as .safetensors
    half: bool = False


class TrainConfig(_Section):
    run: RunSettings = Field(default_factory=RunSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    loss: LossSettings = Field(default_factory=lambda: LossSettings(charbonnier=1.0))
    optim: OptimSettings = Field(default_factory=OptimSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)


def load_config(path: Path | str) -> TrainConfig:
    """Read and validate a training TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"training config {path} not found") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML file ({exc})") from exc
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc
