"""Shared test helpers: locating ../shared and making synthetic clips."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference"
MEDIA = SHARED / "media"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "official_pipeline_fixture.npz").is_file():
        pytest.skip(f"reference fixtures not found at {REFERENCE} (clone ../shared beside the project)")
    return REFERENCE


@pytest.fixture(scope="session")
def media_dir() -> Path:
    if not MEDIA.is_dir() or not any(MEDIA.glob("*.mp4")):
        pytest.skip(f"real clips not found at {MEDIA} (clone ../shared beside the project)")
    return MEDIA


@pytest.fixture(scope="session")
def official_fixture(reference_dir: Path):
    import numpy as np

    return dict(np.load(reference_dir / "official_pipeline_fixture.npz"))
