"""Face flicker: the frame-to-frame change of a row's error under the face."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kfgan_daemon.eval.evaluate import INPUT_KEY, ModelSpec, evaluate
from kfgan_daemon.eval.flicker import FlickerMeter, face_region_mask
from kfgan_daemon.face import alignment_matrix
from kfgan_daemon.restore.settings import RestoreSettings

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "kfgan-lite.safetensors"

SHAPE = (120, 160)


def _face() -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[30:90, 40:120] = True
    return mask


def test_a_steady_error_does_not_flicker_and_an_alternating_one_does() -> None:
    rng = np.random.default_rng(0)
    meter = FlickerMeter()
    bias = rng.normal(0, 4, SHAPE)
    for index in range(6):
        truth = rng.integers(20, 230, SHAPE).astype(np.uint8)
        steady = (truth + 3).astype(np.uint8)  # the same error every frame
        sign = 1 if index % 2 else -1
        alternating = (truth.astype(int) + sign * 2).astype(np.uint8)
        noisy = np.clip(np.rint(truth + bias), 0, 255).astype(np.uint8)
        meter.add(truth, {"steady": steady, "alternating": alternating, "fixed_pattern": noisy}, _face())
    assert meter.flicker("steady") == 0.0
    assert meter.flicker("alternating") == pytest.approx(4.0)
    assert meter.flicker("fixed_pattern") == pytest.approx(0.0, abs=0.05)  # a fixed error pattern is no flicker
    assert meter.pairs("steady") == 5


def test_only_consecutive_frames_with_a_face_are_compared() -> None:
    meter = FlickerMeter()
    truth = np.full(SHAPE, 100, np.uint8)
    meter.add(truth, {"row": truth}, _face())
    meter.add(truth, {}, None)  # no face: the chain breaks
    meter.add(truth, {"row": truth + 7}, _face())
    assert meter.flicker("row") is None and meter.pairs("row") == 0
    meter.add(truth, {"row": truth + 9}, _face())
    meter.add(truth, {"row": np.where(_face(), truth + 9, truth + 50).astype(np.uint8)}, _face())
    # Only the pixels under the face count: the change outside it is ignored.
    assert meter.flicker("row") == pytest.approx(1.0) and meter.pairs("row") == 2


def test_face_region_is_the_crop_footprint_in_the_frame() -> None:
    rng = np.random.default_rng(1)
    landmarks = rng.uniform(-30, 30, size=(68, 2)) + (320, 240)
    landmarks[36:42] = [[300 + i, 240] for i in range(6)]
    landmarks[42:48] = [[340 + i, 240] for i in range(6)]
    matrix = alignment_matrix(landmarks)
    mask = face_region_mask(matrix, 480, 640)
    scale = float(np.hypot(*matrix[:, 0]))
    assert mask.sum() == pytest.approx((256 / scale) ** 2, rel=0.03)
    ys, xs = np.nonzero(mask)
    # The eyes' midpoint sits at the crop's (0.5, 0.45): the footprint is centred on the face.
    assert xs.mean() == pytest.approx(322.5, abs=2) and ys.mean() > 240


class _Unchanged(torch.nn.Module):
    """A generator that returns its input: the path around the model must add no flicker of its own."""

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return compressed


@pytest.mark.shared
@pytest.mark.slow
def test_eval_reports_face_flicker_and_the_restoration_path_adds_none(media_dir: Path, tmp_path: Path) -> None:
    clip = media_dir / "d18.mp4"  # a still close-up: flicker shows most where nothing moves
    if not clip.is_file() or not SHIPPED_MODEL.is_file():
        pytest.skip(f"{clip} or {SHIPPED_MODEL} not found")
    models = [ModelSpec("unchanged", _Unchanged()), ModelSpec("kfgan-lite", SHIPPED_MODEL)]
    variants = {
        "default": RestoreSettings(),
        "fresh repeats": RestoreSettings(repeat_update=1.0),
        "raw landmarks": RestoreSettings(smooth_landmarks=False, repeat_update=1.0),
    }
    flicker = {}
    for name, settings in variants.items():
        report = evaluate([clip], 42, models, tmp_path / name, max_frames=30, settings=settings)
        rows = {row.key: row for row in report.clips[0].rows}
        assert all(row.face_flicker is not None for row in rows.values())
        flicker[name] = {key: row.face_flicker for key, row in rows.items()}
    data = json.loads((tmp_path / "default" / "eval.json").read_text())
    assert {row["key"]: row["face_flicker"] for row in data["clips"][0]["rows"]} == flicker["default"]
    assert "face flicker (Y levels)" in (tmp_path / "default" / "eval.md").read_text()
    steady = flicker["default"]
    # The codec's own frame-to-frame noise is there, and a generator that changes nothing adds none.
    assert steady[INPUT_KEY] > 0.1
    assert steady["unchanged"] <= steady[INPUT_KEY]
    # Smoothed landmarks make the model's face steadier than raw ones do ...
    assert flicker["fresh repeats"]["kfgan-lite"] < flicker["raw landmarks"]["kfgan-lite"] - 0.03
    # ... and keeping what was sent for the pixels the codec repeated steadies it further.
    assert steady["kfgan-lite"] < flicker["fresh repeats"]["kfgan-lite"] - 0.03
