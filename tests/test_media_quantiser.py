"""The input's quantiser as the decoder reports it, and the output CRF the restore command takes from it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kfgan_daemon.errors import InputError
from kfgan_daemon.media import FileSink
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.quantiser import QuantiserProfile, probe_quantiser
from kfgan_daemon.restore.file_job import MAX_AUTO_CRF, OUTPUT_QP_MARGIN, output_crf


def _write(path: Path, crf: int, frames: int = 12) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(128, 160, 3), dtype=np.uint8)
    with FileSink(path, 160, 128, 25, crf=crf, gop=25) as sink:
        for n in range(frames):
            rgb = np.roll(base, 2 * n, axis=1)
            sink.write(DecodedFrame.from_rgb(rgb, ColourSpace("bt601"), index=n))
    return path


def test_probe_reads_a_finer_quantiser_from_a_finer_stream(tmp_path: Path) -> None:
    fine = probe_quantiser(_write(tmp_path / "fine.mp4", 20))
    coarse = probe_quantiser(_write(tmp_path / "coarse.mp4", 40))
    assert fine is not None and coarse is not None
    assert len(fine.frame_qps) == len(coarse.frame_qps) == 12
    # x264's CRF is on the QP scale: the mean block quantiser lands near it.
    assert 12 < fine.mean < 28 and 32 < coarse.mean < 48, (fine.mean, coarse.mean)
    assert coarse.mean - fine.mean > 12
    assert len(probe_quantiser(tmp_path / "coarse.mp4", max_frames=5).frame_qps) == 5


def test_every_decoded_frame_carries_the_quantiser_the_probe_reads(tmp_path: Path) -> None:
    from kfgan_daemon.media import FileSource

    path = _write(tmp_path / "coarse.mp4", 40)
    profile = probe_quantiser(path)
    with FileSource(path) as source:
        quantisers = [frame.quantiser for frame in source]
    assert profile is not None and quantisers == list(profile.frame_qps)
    assert DecodedFrame.from_rgb(np.zeros((16, 16, 3), np.uint8), ColourSpace("bt601")).quantiser is None


def test_output_crf_follows_the_input_and_has_a_ceiling() -> None:
    assert output_crf(None) == MAX_AUTO_CRF
    assert output_crf(QuantiserProfile((33.0, 33.4))) == 33 - OUTPUT_QP_MARGIN
    assert output_crf(QuantiserProfile((51.0,))) == MAX_AUTO_CRF
    assert output_crf(QuantiserProfile((12.0,))) == 0


def test_probe_of_a_file_without_video_says_so(tmp_path: Path) -> None:
    import av

    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    assert probe_quantiser(path) is None
    with pytest.raises(InputError, match="cannot open"):
        probe_quantiser(tmp_path / "missing.mp4")
