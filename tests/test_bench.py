"""The offline bench's machine figure: generator ms per crop on one torch thread."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from kfgan_daemon.bench import measure_generator_ms_one_thread
from kfgan_daemon.model.lite import LiteGenerator
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.restore.generator import SPEED_CALLS
from kfgan_daemon.restore.job import FaceJob


def test_generator_is_timed_on_one_thread_and_the_thread_count_is_given_back() -> None:
    torch.manual_seed(0)
    generator = CropGenerator(LiteGenerator())
    seen: list[tuple[int, int]] = []

    def recording(jobs: Sequence[FaceJob]) -> list[np.ndarray]:
        seen.append((len(jobs), torch.get_num_threads()))
        return generator(jobs)

    before = torch.get_num_threads()
    ms = measure_generator_ms_one_thread(recording)
    assert ms > 0
    assert seen == [(1, 1)] * (SPEED_CALLS + 1)  # batch 1, one thread, one unmeasured call first
    assert torch.get_num_threads() == before


def test_thread_count_is_given_back_when_the_generator_fails() -> None:
    def failing(jobs: Sequence[FaceJob]) -> list[np.ndarray]:
        raise RuntimeError("out of memory")

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="out of memory"):
        measure_generator_ms_one_thread(failing)
    assert torch.get_num_threads() == before
