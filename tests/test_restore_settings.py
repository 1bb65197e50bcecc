"""RestoreSettings: the one check of the per-stream choices."""
from __future__ import annotations

import pytest

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.face import ALIGNMENT_MODES, DETECTOR_KINDS, MASK_SHAPES, PASTE_MODES, WARP_MODES
from kfgan_daemon.keyframes import KEYFRAME_POLICIES
from kfgan_daemon.restore.settings import RestoreSettings

CHOICES = {
    "detector": DETECTOR_KINDS,
    "keyframe_policy": KEYFRAME_POLICIES,
    "warp_mode": WARP_MODES,
    "alignment": ALIGNMENT_MODES,
    "paste_mode": PASTE_MODES,
    "paste_mask": MASK_SHAPES,
}


@pytest.mark.parametrize("field", sorted(CHOICES))
def test_every_choice_is_accepted_and_a_bad_one_names_its_field(field: str) -> None:
    for value in CHOICES[field]:
        assert getattr(RestoreSettings(**{field: value}), field) == value
    with pytest.raises(ConfigError, match=rf"^{field}: 'nonsense' is not one of {', '.join(CHOICES[field])}$"):
        RestoreSettings(**{field: "nonsense"})


def test_a_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        RestoreSettings(warp_mode="nonsense")  # type: ignore[arg-type]
