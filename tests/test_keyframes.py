"""KeyframeStore: the paper's LFU policy replayed against the published trace, and the max-distance ablation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.keyframes import KeyframeStore

CROP = np.zeros((4, 4, 3), dtype=np.uint8)


def _points(value: float, shape=(68, 2)) -> np.ndarray:
    return np.full(shape, value, dtype=np.float64)


@pytest.fixture(scope="module")
def lfu_trace(reference_dir):
    return json.loads((reference_dir / "lfu_policy_trace.json").read_text())


@pytest.mark.shared
@pytest.mark.parametrize("size", [1, 3, 5])
def test_lfu_replays_published_trace(lfu_trace, size):
    (policy,) = [p for p in lfu_trace["policies"] if p["max_keyframes"] == size]
    events = lfu_trace["events"]
    assert len(policy["trace"]) == len(events) == 120
    store = KeyframeStore(max_size=size, policy="lfu")
    for step, (event, expected) in enumerate(zip(events, policy["trace"])):
        assert expected["step"] == step
        landmarks = np.asarray(event["landmarks"], dtype=np.float64)
        if event["keyframe"]:
            assert store.offer(step, landmarks, CROP)
        chosen = store.select(landmarks)
        assert chosen is not None
        assert chosen.key_id == expected["reference"], f"step {step}"
        assert [e.key_id for e in store.entries] == expected["store_after"], f"step {step}"
        assert [e.usage for e in store.entries] == expected["usage_after"], f"step {step}"


def test_lfu_counts_halve_on_every_keyframe_and_least_used_leaves():
    store = KeyframeStore(max_size=2, policy="lfu")
    store.offer(0, _points(0), CROP)
    for _ in range(4):
        store.select(_points(0))
    store.offer(1, _points(10), CROP)  # not full: no eviction, but counts halve
    assert [(e.key_id, e.usage) for e in store.entries] == [(0, 2.0), (1, 0.0)]
    store.select(_points(9))
    store.offer(2, _points(20), CROP)  # full: key 1 (usage 1) leaves, key 0 (usage 2) stays
    assert [(e.key_id, e.usage) for e in store.entries] == [(0, 1.0), (2, 0.0)]


def test_lfu_eviction_tie_goes_to_lowest_position():
    store = KeyframeStore(max_size=2, policy="lfu")
    store.offer(0, _points(0), CROP)
    store.offer(1, _points(10), CROP)
    store.offer(2, _points(20), CROP)
    assert [e.key_id for e in store.entries] == [1, 2]


def test_select_nearest_ties_lowest_position_and_counts_usage():
    store = KeyframeStore(max_size=3)
    store.offer(7, _points(0), CROP)
    store.offer(8, _points(2), CROP)
    chosen = store.select(_points(1))  # equidistant from both
    assert chosen.key_id == 7 and chosen.usage == 1.0
    assert store.select(_points(1.9)).key_id == 8


def test_nearest_distance_does_not_count_usage():
    store = KeyframeStore()
    assert store.nearest_distance(_points(0)) is None
    assert store.select(_points(0)) is None
    store.offer(1, _points(0), CROP)
    store.offer(2, _points(3), CROP)
    assert store.nearest_distance(_points(1)) == pytest.approx(np.sqrt(136.0))
    assert [e.usage for e in store.entries] == [0.0, 0.0]


def test_landmarks_are_copied_and_crop_kept():
    store = KeyframeStore()
    points = _points(5)
    crop = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    store.offer(3, points, crop)
    points[:] = 0
    (entry,) = store.entries
    assert entry.landmarks[0, 0] == 5.0
    assert entry.crop is crop


def test_clear_and_len():
    store = KeyframeStore(max_size=4)
    for key in range(6):
        store.offer(key, _points(key), CROP)
    assert len(store) == 4
    store.clear()
    assert len(store) == 0 and store.select(_points(0)) is None


def test_max_distance_keeps_the_set_diverse():
    store = KeyframeStore(max_size=3, policy="max_distance")
    for key, value in enumerate([0.0, 10.0, 20.0]):
        assert store.offer(key, _points(value), CROP)
    # A near-duplicate of a member adds nothing: it is the one dropped.
    assert not store.offer(3, _points(10.5), CROP)
    assert [e.key_id for e in store.entries] == [0, 1, 2]
    # A new pose far from all replaces one of the closest pair; the set's smallest gap grows.
    assert store.offer(4, _points(100.0), CROP)
    kept = [e.key_id for e in store.entries]
    assert 4 in kept and len(kept) == 3 and 0 in kept and 2 in kept
    assert kept[-1] == 4


def test_max_distance_drops_the_member_nearer_to_the_rest():
    store = KeyframeStore(max_size=3, policy="max_distance")
    for key, value in enumerate([0.0, 4.0, 5.0]):
        store.offer(key, _points(value), CROP)
    # Members 1 and 2 are the closest pair; dropping 1 leaves gaps (5, 45) against (4, 46) for dropping 2.
    assert store.offer(3, _points(50.0), CROP)
    assert [e.key_id for e in store.entries] == [0, 2, 3]


def test_max_distance_size_one_keeps_newest():
    store = KeyframeStore(max_size=1, policy="max_distance")
    store.offer(0, _points(0), CROP)
    assert store.offer(1, _points(1), CROP)
    assert [e.key_id for e in store.entries] == [1]


def test_invalid_arguments():
    with pytest.raises(ConfigError, match="store size"):
        KeyframeStore(max_size=0)
    store = KeyframeStore()
    store.offer(0, _points(0), CROP)
    with pytest.raises(ValueError):
        store.offer(1, _points(0, shape=(5, 2)), CROP)
    with pytest.raises(ValueError):
        store.select(_points(0, shape=(5, 2)))


def test_lfu_set_of_one_replaces_and_keeps_counting():
    store = KeyframeStore(max_size=1, policy="lfu")
    store.offer(0, _points(0), CROP)
    store.select(_points(0))
    store.select(_points(0))
    store.offer(1, _points(5), CROP)
    assert [(e.key_id, e.usage) for e in store.entries] == [(1, 2.0)]
