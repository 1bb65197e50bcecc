"""The command line as a newcomer meets it: fast errors for bad paths, flags that look like flags, honest reports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
from typer.testing import CliRunner

from clips import write_synthetic_clip
from kfgan_daemon.cli import app

HEAVY = ("torch", "dlib", "cv2")
# Runs the CLI in a fresh interpreter and reports its exit code and which heavy modules it had imported.
_PROBE = """
import json, sys
from kfgan_daemon.cli import main
sys.argv = ["kfgan-daemon", *json.loads(sys.argv[1])]
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_cli(*args: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(args))], capture_output=True, text=True, timeout=60, check=False
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_missing_input_is_reported_before_heavy_libraries_load(tmp_path: Path) -> None:
    result, stderr = run_cli("restore", str(tmp_path / "missing.mp4"), str(tmp_path / "out.mp4"))
    assert result == {"code": 2, "heavy": []}
    assert "does not exist" in stderr and "missing.mp4" in stderr


def test_a_file_that_is_not_a_video_is_reported_before_heavy_libraries_load(tmp_path: Path) -> None:
    fake = tmp_path / "call.mp4"
    fake.write_text("not a video\n")
    for command in (["restore", str(fake), str(tmp_path / "out.mp4")], ["bench", str(fake)]):
        result, stderr = run_cli(*command)
        assert result == {"code": 1, "heavy": []}
        assert "kfgan-daemon: error:" in stderr and "not a video FFmpeg can read" in stderr


def test_missing_output_folder_is_reported_before_heavy_libraries_load(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "clip.mp4", frames=3)
    result, stderr = run_cli("restore", str(clip), str(tmp_path / "nowhere" / "out.mp4"))
    assert result == {"code": 1, "heavy": []}
    assert "does not exist" in stderr


def test_other_commands_check_their_paths_first(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    for command in (
        ["eval", "--clips", missing],
        ["pipe", "--input", missing, "--output", "-"],
        ["train", "--config", missing],
        ["serve", "--config", missing],
        ["dataset", "build", "--config", missing],
    ):
        result, stderr = run_cli(*command)
        assert result == {"code": 2, "heavy": []}, command
        assert "does not exist" in stderr, command


def test_on_off_options_read_as_flags_in_help() -> None:
    runner = CliRunner()
    for command in ("restore", "bench", "eval", "train"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert "<bool>" not in text, command
    restore_help = runner.invoke(app, ["restore", "--help"], terminal_width=200).output
    assert "--side-by-side / --no-side-by-side" in restore_help
    assert "--degrade-crf" in restore_help


def test_bench_says_how_many_of_the_clips_frames_it_timed(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "clip.mp4", frames=12)
    result = CliRunner().invoke(app, ["bench", str(clip), "--frames", "5"])
    assert result.exit_code == 0, result.output
    assert "timed 5 of the clip's 12 frames" in result.output


def test_degrade_crf_side_by_side_shows_the_call_as_received_beside_the_restored_one(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "clip.mp4", frames=6, width=160, height=128)
    out = tmp_path / "demo.mp4"
    result = CliRunner().invoke(
        app, ["restore", str(clip), str(out), "--degrade-crf", "42", "--side-by-side", "--quiet", "--crf", "0"]
    )
    assert result.exit_code == 0, result.output
    with av.open(str(clip)) as source:
        original = next(source.decode(video=0)).to_ndarray(format="gray")
    with av.open(str(out)) as written:
        first = next(written.decode(video=0))
        assert (first.width, first.height) == (320, 128)
        luma = first.to_ndarray(format="gray")
    bar = 16  # the caption bar: 1/16 of the height, at least 16 rows
    left, right = luma[:, :160], luma[:, 160:]
    # Both halves carry a caption bar: black with some white text.
    for half in (left, right):
        assert np.median(half[:bar]) <= 20 and half[:bar].max() >= 200
    # No face in the clip, so the restored half is the received one; and CRF 42 really degraded it.
    assert np.abs(left[bar:].astype(int) - right[bar:].astype(int)).max() <= 1
    assert np.abs(left[bar:].astype(int) - original[bar:].astype(int)).mean() > 1.0
