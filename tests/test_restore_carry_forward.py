"""Carrying the last restored correction onto a frame that could not be restored in time (issue 8).

The correction (restored minus compressed crop) lives in crop space: pasted
with the later frame's own alignment it follows the face, touches only the
pixels under the paste mask, and is never carried across a change of person
or for longer than ``carry_forward_seconds``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from test_restore_stream import _frame, _restorer, _template_landmarks


def restored_then(landmarks_later: np.ndarray, **settings: object):
    marks = _template_landmarks()
    restorer = _restorer([marks, landmarks_later, landmarks_later], identity_check=False, **settings)
    first = _frame(0, keyframe=True)
    job = restorer.prepare(first)
    assert not restorer.can_carry_forward and restorer.carry_forward(first, job.matrix) is None
    brighter = np.clip(job.compressed.astype(int) + 40, 0, 255).astype(np.uint8)
    restorer.complete(first, job, brighter)
    return restorer, job


def test_correction_follows_the_face_and_touches_nothing_else() -> None:
    restorer, first_job = restored_then(_template_landmarks(shift=30.0))
    later = _frame(1, keyframe=False)
    matrix = restorer.locate(later)
    assert matrix is not None and not np.allclose(matrix, first_job.matrix)
    assert restorer.can_carry_forward
    carried = restorer.carry_forward(later, matrix)
    assert carried is not None and restorer.stats.carried_forward == 1
    changed = np.argwhere(carried.y != later.y)
    # brighter where the face is now (moved 30 px right), everything else bit for bit
    centre = ((_template_landmarks(shift=30.0).min(axis=0) + _template_landmarks(shift=30.0).max(axis=0)) / 2).astype(int)
    cx, cy = centre
    assert int(carried.y[cy, cx]) - int(later.y[cy, cx]) > 20
    assert changed[:, 1].min() > 60 + 30 - 25 and changed[:, 1].max() < 260 + 30
    assert np.array_equal(carried.y[:, :80], later.y[:, :80])
    assert np.array_equal(carried.u[:, :40], later.u[:, :40]) and np.array_equal(carried.v[:, :40], later.v[:, :40])
    assert carried.pts == later.pts and carried.index == later.index


def test_nothing_is_carried_when_it_is_too_old_or_the_person_changed() -> None:
    restorer, job = restored_then(_template_landmarks(), carry_forward_seconds=0.1)
    late = _frame(5, keyframe=False)  # 5 frames at 25 FPS: 0.2 s after the restored one
    assert restorer.carry_forward(late, job.matrix) is None
    assert restorer.carry_forward(_frame(2, keyframe=False), job.matrix) is not None  # 0.08 s
    restorer.faces._clear_store()  # what a new person does
    assert not restorer.can_carry_forward
    assert restorer.carry_forward(_frame(2, keyframe=False), job.matrix) is None


def test_skip_reason_says_why_prepare_gave_no_job() -> None:
    marks = _template_landmarks()
    restorer = _restorer([None, marks, marks], identity_check=False)
    assert restorer.prepare(_frame(0, keyframe=False)) is None and restorer.skip_reason == "no_face"
    assert restorer.prepare(_frame(1, keyframe=False)) is None and restorer.skip_reason == "no_keyframe"
    assert restorer.prepare(_frame(2, keyframe=True)) is not None and restorer.skip_reason is None


def test_without_time_to_follow_the_face_its_last_alignment_serves() -> None:
    restorer, _ = restored_then(_template_landmarks(shift=30.0))
    later = _frame(1, keyframe=False)
    matrix = restorer.locate(later)
    unfollowed = _frame(2, keyframe=False)
    carried = restorer.carry_forward(unfollowed)
    assert carried is not None
    assert carried.same_pixels(restorer.carry_forward(unfollowed, matrix))


@pytest.mark.shared
@pytest.mark.slow
def test_quality_cost_of_carrying_forward_is_measured_on_a_real_clip(media_dir: Path) -> None:
    from kfgan_daemon.eval.carry_forward import measure_carry_forward, render_rows
    from kfgan_daemon.restore.model_choice import open_generator

    rows = measure_carry_forward(media_dir / "d12.mp4", open_generator(), intervals=(1, 2), max_frames=12)
    print("\n" + render_rows(rows, crf=42))
    labels = [row.label for row in rows]
    assert labels == ["compressed", "every frame", "every 2", "every 2, unfollowed", "every 2, unrestored between"]
    by_label = {row.label: row for row in rows}
    assert by_label["every frame"].restored >= 10 and by_label["every frame"].carried_forward == 0
    assert by_label["every 2"].carried_forward >= 5 and by_label["every 2, unrestored between"].carried_forward == 0
    assert all(row.face_frames >= 10 and math.isfinite(row.face_psnr_db) for row in rows)
