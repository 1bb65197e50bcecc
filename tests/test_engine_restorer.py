"""The restorer as the engine's threads share it (engine/restorer.py): one face step at a time, state cached."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine_support import ScriptedRestorer, make_frame
from kfgan_daemon.engine.restorer import GuardedRestorer

pytestmark = pytest.mark.timeout(30)


def test_face_steps_of_one_stream_never_overlap() -> None:
    restorer = ScriptedRestorer(prepare_delay=0.01)
    guarded = GuardedRestorer("s", restorer)
    frames = [make_frame(n) for n in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda f: guarded.prepare(f) if f.index % 2 else guarded.locate(f), frames))
    assert not restorer.overlapped


def test_the_state_the_event_loop_reads_follows_each_call() -> None:
    guarded = GuardedRestorer("s", ScriptedRestorer())
    assert guarded.needs_keyframe and not guarded.can_carry and guarded.keyframes_stored is None
    assert guarded.prepare(make_frame(3)) is None
    assert guarded.skip_reason == "no_keyframe" and guarded.followed_index == 3
    job = guarded.prepare(make_frame(10))  # an I-frame: stored, then restorable
    assert job is not None and guarded.skip_reason is None and guarded.keyframes_stored == 1
    assert not guarded.needs_keyframe and not guarded.can_carry
    guarded.complete(make_frame(10), job, np.full((8, 8, 3), 7, np.uint8))
    assert guarded.can_carry
    matrix = guarded.locate(make_frame(11))
    assert matrix is not None and guarded.followed_index == 11


def test_a_failing_step_still_refreshes_the_state() -> None:
    restorer = ScriptedRestorer(fail_prepare={12}, store=[10])
    guarded = GuardedRestorer("s", restorer)
    assert guarded.needs_keyframe  # nothing read yet
    with pytest.raises(RuntimeError, match="scripted prepare failure"):
        guarded.prepare(make_frame(12))
    assert guarded.keyframes_stored == 1 and not guarded.needs_keyframe


def test_a_builder_is_called_only_by_build_and_used_once_installed() -> None:
    built: list[int] = []

    def build() -> ScriptedRestorer:
        built.append(threading.get_ident())
        time.sleep(0.001)
        return ScriptedRestorer()

    guarded = GuardedRestorer("s", build)
    assert not guarded.ready and not built
    with ThreadPoolExecutor(1) as pool:
        restorer = pool.submit(guarded.build).result()
    assert built and built[0] != threading.get_ident() and not guarded.ready
    guarded.install(restorer)
    assert guarded.ready and guarded.restorer is restorer and guarded.needs_keyframe
