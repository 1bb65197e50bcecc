"""Fitting a model's gain on its correction by the frame's quantiser (see model.quantiser_strength).

The fit belongs on persons the generator never trained on, as the callers it will
restore: it corrects its training persons better than anyone new (on them the fit gave
0.83-0.89 at QP 17-23, where the validation persons give 0.67). It runs the model as
the restorer does on every sample of a dataset split (the validation one by default):
the compressed crop, the keyframe as the receiver decoded it (``stream`` reference: with
the hq sender that is its fine I-frame), the model's own keyframe refinement. Each
crop's correction and error go into the bin of its frame's quantiser, which the dataset
recorded as the decoder reported it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kfgan_daemon.errors import InputError
from kfgan_daemon.face import landmark_image
from kfgan_daemon.model.quantiser_strength import QuantiserStrength, StrengthFit
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.train import dataset as ds

log = logging.getLogger(__name__)

_BATCH = 8
_KEYS = (ds.COMPRESSED, ds.TARGET, ds.REFERENCE_STREAM, ds.CROP_LANDMARKS, ds.QUANTISER)


@dataclass
class StrengthReport:
    """What a fit used and found, for the model's metadata and the command's summary."""

    split: str
    files: int
    quantisers: list[float]
    gains: list[float]
    crops: list[int]

    def as_metadata(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        return ", ".join(f"QP {q:.1f}: {g:.2f} ({n} crops)" for q, g, n in zip(self.quantisers, self.gains, self.crops))


def fit_quantiser_strength(
    data_dir: Path,
    generator: CropGenerator,
    split: str = "validation",
    on_file: Callable[[str, int], None] | None = None,
) -> tuple[QuantiserStrength, StrengthReport]:
    """Fit on ``split`` of the dataset at ``data_dir``: the strength, and what the fit used and found.

    ``generator`` runs at full correction: the jobs it is given carry no quantiser, so a
    strength its model already carries does not apply. ``on_file(name, crops)`` is told
    after each sample file.
    """
    manifest = ds.DatasetManifest.read(Path(data_dir))
    names = manifest.files_of(split)
    if not names:
        raise InputError(f"{data_dir}: the dataset has no {split!r} files to fit a quantiser strength on")
    strength, crops = _gather(Path(data_dir), names, generator, on_file).result()
    report = StrengthReport(
        split, len(names), [round(float(q), 2) for q in strength.quantisers],
        [round(float(g), 4) for g in strength.gains], crops,
    )
    return strength, report


def _gather(
    data_dir: Path, names: list[str], generator: CropGenerator, on_file: Callable[[str, int], None] | None
) -> StrengthFit:
    fit = StrengthFit()
    for name in names:
        with ds.open_sample_file(data_dir / name) as arrays:
            parts = {key: arrays[key] for key in _KEYS}
        rows = np.flatnonzero(np.isfinite(parts[ds.QUANTISER]))
        for start in range(0, len(rows), _BATCH):
            batch = rows[start : start + _BATCH]
            jobs = [
                FaceJob(
                    parts[ds.COMPRESSED][i], parts[ds.REFERENCE_STREAM][i], landmark_image(parts[ds.CROP_LANDMARKS][i]),
                    np.eye(2, 3), parts[ds.CROP_LANDMARKS][i], -1,
                )
                for i in batch
            ]
            for i, restored in zip(batch, generator(jobs)):
                compressed = parts[ds.COMPRESSED][i].astype(np.float32)
                fit.add(float(parts[ds.QUANTISER][i]), restored - compressed, parts[ds.TARGET][i] - compressed)
        log.info("quantiser strength: %s gave %d crops", name, len(rows))
        if on_file is not None:
            on_file(name, len(rows))
    return fit
