"""The training loop: generator (and optional discriminator) steps, validation, checkpoints.

A run lives in one folder (``run.dir``): ``last.pt`` (everything needed to continue
exactly: weights, optimizers, AMP scaler, step, RNG states; the data order and the
augmentation are functions of the step), ``best.pt`` (the generator with the best
validation PSNR), ``metrics.jsonl`` (one JSON object per log or validation event).
Starting the same configuration again continues from ``last.pt``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kfgan_daemon.errors import ConfigError, ModelError
from kfgan_daemon.process.signals import stop_on_signals
from kfgan_daemon.train import losses as L
from kfgan_daemon.train.config import TrainConfig, load_config
from kfgan_daemon.train.samples import (
    Augmentation,
    Batch,
    SampleSet,
    TrainingBatches,
    batch_stream,
    validation_batches,
)

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_LOG = "metrics.jsonl"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    steps: int
    best_psnr: float | None
    best_step: int | None
    train_seconds: float
    run_dir: Path
    last_validation: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False


def generator_for(config: TrainConfig) -> nn.Module:
    """The untrained generator ``config.model`` describes, initialised from ``model.init`` when set."""
    from kfgan_daemon.model import build_generator, load_generator
    from kfgan_daemon.model.blocks import load_deepened

    try:
        generator = build_generator(config.model.variant, config.model.config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.config does not fit the {config.model.variant} generator: {exc}") from exc
    if config.model.init is not None:
        initial = load_generator(config.model.init, variant=config.model.variant, device="cpu")
        origin = f"model.init {config.model.init}"
        added = load_deepened(generator, initial.state_dict(), origin)
        if added:
            log.info("%s: deepened by %d residual blocks that start as identity (%s)", origin, len(added), ", ".join(added))
    return generator


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def _rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # Plain lists, so that the checkpoint loads with weights_only=True.
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)


class Trainer:
    """One training run. ``train_samples``/``validation_samples`` default to the configured dataset."""

    def __init__(
        self,
        config: TrainConfig,
        train_samples: SampleSet | None = None,
        validation_samples: SampleSet | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(config.run.dir)
        self.device = resolve_device(config.run.device)
        if config.run.threads is not None:
            torch.set_num_threads(config.run.threads)
        torch.manual_seed(config.run.seed)
        np.random.seed(config.run.seed)
        random.seed(config.run.seed)
        data = config.data
        self.train_samples = train_samples or SampleSet(
            data.dir, "train", data.reference_modes, data.exclude_self_reference, data.clean_keyframes, data.reference_flow
        )
        # Validation leaves out what would flatter it (hq references that are the target
        # itself) and what it would not measure (clean inputs), and reports each mode.
        self.validation_samples = validation_samples or SampleSet(
            data.dir, "validation", data.reference_modes, data.exclude_self_reference, reference_flow=data.reference_flow
        )
        augmentation = Augmentation(data.shift, data.rotate, data.cutout_probability, data.cutout_size)
        self.batches = TrainingBatches(
            self.train_samples, config.optim.batch_size, data.patch_size, augmentation, config.run.seed
        )
        self.generator = generator_for(config).to(self.device)
        optim = config.optim
        # Its first update copies the generator, so a run resumed without one starts it there.
        self.ema: AveragedModel | None = None
        if optim.ema is not None:
            self.ema = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(optim.ema), use_buffers=True)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=optim.lr, betas=optim.betas)
        self.perceptual: L.PerceptualLoss | None = None
        if config.loss.needs_vgg:
            self.perceptual = L.PerceptualLoss(L.VGGFeatures(config.loss.vgg_weights)).to(self.device)
        self.discriminator: nn.Module | None = None
        self.discriminator_optimizer: torch.optim.Optimizer | None = None
        if config.loss.adversarial > 0:
            from kfgan_daemon.model import MultiScaleDiscriminator

            self.discriminator = MultiScaleDiscriminator().to(self.device)
            self.discriminator_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=optim.discriminator_lr, betas=optim.betas
            )
        self.amp = config.schedule.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.step = 0
        self.best_psnr: float | None = None
        self.best_step: int | None = None
        self.train_seconds = 0.0
        self.last_validation: dict[str, float] = {}

    # -- one step ---------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()

    def _learning_rate(self, step: int, base: float) -> float:
        passed = sum(1 for milestone in self.config.optim.milestones if step >= milestone)
        return base * self.config.optim.lr_decay**passed

    def _discriminate(self, images: torch.Tensor) -> list[torch.Tensor]:
        assert self.discriminator is not None
        outputs = self.discriminator(images)
        return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)

    def reconstruction_losses(self, restored: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        weights = self.config.loss
        terms: dict[str, torch.Tensor] = {}
        restored = restored.float()
        if weights.mse:
            terms["mse"] = weights.mse * L.mse_loss(restored, target)
        if weights.charbonnier:
            terms["charbonnier"] = weights.charbonnier * L.charbonnier_loss(restored, target)
        if weights.ssim:
            terms["ssim"] = weights.ssim * L.ssim_loss(restored, target)
        if weights.gradient:
            terms["gradient"] = weights.gradient * L.gradient_loss(restored, target)
        if self.perceptual is not None:
            perceptual, style = self.perceptual(restored, target)
            if weights.perceptual:
                terms["perceptual"] = weights.perceptual * perceptual
            if weights.style:
                terms["style"] = weights.style * style
        return terms

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimisation step on ``batch``; returns the loss terms (weighted) as floats."""
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate(self.step, self.config.optim.lr)
        batch = batch.to(self.device)
        self.generator.train()
        with self._autocast():
            restored = self.generator(batch.compressed, batch.reference, batch.landmarks)
            terms = self.reconstruction_losses(restored, batch.target)
            if self.discriminator is not None:
                self.discriminator.requires_grad_(False)
                terms["adversarial"] = self.config.loss.adversarial * L.generator_hinge_loss(
                    self._discriminate(restored), self.config.loss.discriminator_scale_weights
                )
            loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise ModelError(f"training diverged at step {self.step}: loss is {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.generator.parameters(), self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        values = {name: float(value.detach()) for name, value in terms.items()}
        if self.discriminator is not None:
            values["discriminator"] = self._discriminator_step(batch.target, restored.detach())
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.generator)
        values["loss"] = float(loss.detach())
        self.step += 1
        return values

    @property
    def evaluated(self) -> nn.Module:
        """The generator that validation measures and export writes: the average when there is one."""
        return self.ema.module if self.ema is not None else self.generator

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        assert self.discriminator is not None and self.discriminator_optimizer is not None
        for group in self.discriminator_optimizer.param_groups:
            group["lr"] = self._learning_rate(self.step, self.config.optim.discriminator_lr)
        self.discriminator.requires_grad_(True)
        self.discriminator.train()
        with self._autocast():
            loss = L.discriminator_hinge_loss(
                self._discriminate(real), self._discriminate(fake), self.config.loss.discriminator_scale_weights
            )
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.discriminator_optimizer)
        return float(loss.detach())

    # -- validation -------------------------------------------------------------------------

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """Mean PSNR/SSIM on the validation split: restored, restored without the reference
        (the degraded crop in its place), and the compressed input itself; PSNR also per
        video and per reference mode."""
        generator = self.evaluated.eval()
        sums = {"psnr": 0.0, "ssim": 0.0, "psnr_noref": 0.0, "psnr_input": 0.0, "ssim_input": 0.0}
        # group ("video" or "mode" name) -> [restored PSNR sum, input PSNR sum, no-reference PSNR sum, count]
        groups: dict[str, list[float]] = {}
        count = 0
        limit = self.config.schedule.validation_samples
        videos = getattr(self.validation_samples, "videos", None)
        modes = getattr(self.validation_samples, "modes", None)
        for indices, batch in validation_batches(self.validation_samples, max(self.config.optim.batch_size, 8), limit):
            batch = batch.to(self.device)
            n = len(batch)
            with self._autocast():
                restored = generator(batch.compressed, batch.reference, batch.landmarks).float().clamp(0, 1)
                noref = generator(batch.compressed, batch.compressed, batch.landmarks).float().clamp(0, 1)
            psnr_restored = L.psnr(restored, batch.target)
            psnr_input = L.psnr(batch.compressed, batch.target)
            psnr_noref = L.psnr(noref, batch.target)
            sums["psnr"] += float(psnr_restored.sum())
            sums["psnr_noref"] += float(psnr_noref.sum())
            sums["psnr_input"] += float(psnr_input.sum())
            sums["ssim"] += float(L.ssim(restored, batch.target)) * n
            sums["ssim_input"] += float(L.ssim(batch.compressed, batch.target)) * n
            for j, index in enumerate(indices):
                names = []
                if videos is not None:
                    names.append(videos[index])
                if modes is not None:
                    names.append(f"mode_{modes[index]}")
                for name in names:
                    entry = groups.setdefault(name, [0.0, 0.0, 0.0, 0])
                    entry[0] += float(psnr_restored[j])
                    entry[1] += float(psnr_input[j])
                    entry[2] += float(psnr_noref[j])
                    entry[3] += 1
            count += n
        scores = {f"val_{k}": v / count for k, v in sums.items()}
        scores["val_psnr_gain"] = scores["val_psnr"] - scores["val_psnr_input"]
        scores["val_ssim_gain"] = scores["val_ssim"] - scores["val_ssim_input"]
        for name, (restored_db, input_db, noref_db, n) in sorted(groups.items()):
            scores[f"val_psnr_{name}"] = restored_db / n
            scores[f"val_psnr_input_{name}"] = input_db / n
            scores[f"val_psnr_noref_{name}"] = noref_db / n
        return scores

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "variant": self.config.model.variant,
            "generator_config": dict(getattr(self.generator, "config", self.config.model.config)),
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "best_psnr": self.best_psnr,
            "best_step": self.best_step,
            "train_seconds": self.train_seconds,
            "last_validation": self.last_validation,
            "reference_flow": self.config.data.reference_flow,
            "face_settings": self.train_samples.face_settings,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.discriminator is not None and self.discriminator_optimizer is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["discriminator_optimizer"] = self.discriminator_optimizer.state_dict()
        return state

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = path or self.run_dir / LAST_CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.checkpoint_state(), path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # torch raises several unrelated types for a bad file
            raise ModelError(f"{path}: cannot read the training checkpoint ({exc}); delete it to start over") from exc
        if state.get("format") != CHECKPOINT_FORMAT or state.get("variant") != self.config.model.variant:
            raise ModelError(f"{path} is not a {self.config.model.variant} training checkpoint of this trainer")
        try:
            self.generator.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and "ema" in state:
                self.ema.load_state_dict(state["ema"])
            elif self.ema is not None:
                log.info("%s has no weight average; it starts from the resumed generator", path)
            if self.discriminator is not None and self.discriminator_optimizer is not None:
                if "discriminator" not in state:
                    raise ModelError(f"{path} has no discriminator but the configuration trains one")
                self.discriminator.load_state_dict(state["discriminator"])
                self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        except RuntimeError as exc:
            raise ModelError(f"{path} does not fit the configured model: {exc}") from exc
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.best_psnr = state["best_psnr"]
        self.best_step = state["best_step"]
        self.train_seconds = float(state["train_seconds"])
        self.last_validation = dict(state["last_validation"])

    def _save_best(self, scores: dict[str, float]) -> None:
        self.best_psnr = scores["val_psnr"]
        self.best_step = self.step
        payload = {
            "format": CHECKPOINT_FORMAT,
            "variant": self.config.model.variant,
            "generator_config": dict(getattr(self.generator, "config", self.config.model.config)),
            "generator": self.evaluated.state_dict(),
            "reference_flow": self.config.data.reference_flow,
            "face_settings": self.train_samples.face_settings,
            "step": self.step,
            "validation": scores,
        }
        _atomic_save(payload, self.run_dir / BEST_CHECKPOINT)
        if self.config.export.best is not None:
            export_generator(
                self.evaluated, self.config.export.best, self.config.model.variant, half=self.config.export.half,
                reference_flow=self.config.data.reference_flow, face_settings=self.train_samples.face_settings,
            )

    # -- the loop ---------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_LOG, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def run(self, max_steps: int | None = None, progress: bool = True) -> TrainResult:
        """Train until ``max_steps`` (default: the configured number), SIGTERM or Ctrl-C;
        validate, log and checkpoint on the configured schedule; always leave ``last.pt``."""
        from tqdm import tqdm

        schedule = self.config.schedule
        final_step = min(max_steps, schedule.max_steps) if max_steps is not None else schedule.max_steps
        interrupted = False
        last_checkpoint = time.monotonic()
        running: dict[str, float] = {}
        bar = tqdm(total=final_step, initial=self.step, desc="train", unit="step", disable=not progress)
        # SIGTERM and SIGINT end the loop after the current step (then a checkpoint is written).
        stop = threading.Event()
        with stop_on_signals(stop.set):
            stream = batch_stream(
                self.batches, self.step, final_step, self.config.run.loader_workers,
                pin_memory=self.device.type == "cuda",
            )
            while not stop.is_set():
                started = time.monotonic()
                batch = next(stream, None)
                if batch is None:
                    break
                values = self.train_step(batch)
                self.train_seconds += time.monotonic() - started
                for name, value in values.items():
                    running[name] = running.get(name, 0.0) + value
                running["_count"] = running.get("_count", 0.0) + 1
                bar.update(1)
                if self.step % schedule.log_every == 0 or self.step == final_step:
                    count = running.pop("_count")
                    means = {name: value / count for name, value in running.items()}
                    running = {}
                    bar.set_postfix(loss=f"{means['loss']:.4f}")
                    self._log({"event": "train", "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                               "train_seconds": round(self.train_seconds, 1), **means})
                if self.step % schedule.validate_every == 0 or self.step == final_step:
                    self._validate_and_log(bar)
                if time.monotonic() - last_checkpoint >= schedule.checkpoint_minutes * 60:
                    self.save_checkpoint()
                    last_checkpoint = time.monotonic()
            interrupted = stop.is_set()
        # Ends the loader's worker processes, if any, before the checkpoint is written.
        del stream
        bar.close()
        self.save_checkpoint()
        return TrainResult(
            steps=self.step,
            best_psnr=self.best_psnr,
            best_step=self.best_step,
            train_seconds=self.train_seconds,
            run_dir=self.run_dir,
            last_validation=self.last_validation,
            interrupted=interrupted,
        )

    def _validate_and_log(self, bar) -> None:
        scores = self.validate()
        self.last_validation = scores
        if self.best_psnr is None or scores["val_psnr"] > self.best_psnr:
            self._save_best(scores)
        bar.write(
            f"step {self.step}: val PSNR {scores['val_psnr']:.3f} dB (input {scores['val_psnr_input']:.3f}, "
            f"no reference {scores['val_psnr_noref']:.3f}), SSIM {scores['val_ssim']:.4f} "
            f"(input {scores['val_ssim_input']:.4f}); best {self.best_psnr:.3f} at {self.best_step}"
        )
        self._log({"event": "validation", "step": self.step, "train_seconds": round(self.train_seconds, 1),
                   "best_psnr": self.best_psnr, "best_step": self.best_step, **scores})


def export_generator(
    generator: nn.Module, path: Path | str, variant: str, half: bool = False, reference_flow: str | None = None,
    face_settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write the generator as our .safetensors, with the metadata ``load_generator`` rebuilds it from,
    the keyframe refinement it was trained with and the face settings its dataset was cut with."""
    from kfgan_daemon.model import save_safetensors

    config = dict(getattr(generator, "config", {}))
    return save_safetensors(
        generator, path, variant, config=config, half=half, reference_flow=reference_flow, face_settings=face_settings
    )


def export_checkpoint(checkpoint: Path | str, path: Path | str, half: bool = False) -> Path:
    """Export the generator of a training checkpoint (``best.pt`` or ``last.pt``) as .safetensors;
    from a ``last.pt`` of a run with a weight average, the average."""
    from kfgan_daemon.model import build_generator

    checkpoint = Path(checkpoint)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise ModelError(f"{checkpoint}: cannot read the training checkpoint ({exc})") from exc
    if state.get("format") != CHECKPOINT_FORMAT or "generator" not in state:
        raise ModelError(f"{checkpoint} is not a training checkpoint of this trainer")
    generator = build_generator(state["variant"], state["generator_config"])
    weights = state["generator"]
    if "ema" in state:
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    generator.load_state_dict(weights)
    return export_generator(
        generator, path, state["variant"], half=half, reference_flow=state.get("reference_flow"),
        face_settings=state.get("face_settings"),
    )


def train(config_path: Path, resume: bool = True, max_steps: int | None = None, progress: bool = True) -> TrainResult:
    """``kfgan-daemon train --config FILE``: train as configured, continuing from
    ``<run.dir>/last.pt`` when it exists and ``resume`` is true."""
    config = load_config(config_path)
    trainer = Trainer(config)
    last = Path(config.run.dir) / LAST_CHECKPOINT
    if resume and last.is_file():
        trainer.load_checkpoint(last)
        log.info("resumed %s at step %d", last, trainer.step)
    elif last.is_file():
        log.warning("starting over: %s exists but resume is off; it will be overwritten", last)
    return trainer.run(max_steps=max_steps, progress=progress)
