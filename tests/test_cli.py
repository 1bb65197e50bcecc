"""The command line as a newcomer meets it: fast errors for bad paths, flags that look like flags, honest reports."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest
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
    # the machine's own speed beside the figures, so that benches on different machines compare
    assert re.search(r"machine: generator \d+\.\d ms per crop on one torch thread", result.output), result.output


def test_degrade_crf_side_by_side_shows_the_original_the_call_as_received_and_the_restored_one(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "clip.mp4", frames=6, width=160, height=128)
    out = tmp_path / "demo.mp4"
    result = CliRunner().invoke(
        app, ["restore", str(clip), str(out), "--degrade-crf", "42", "--side-by-side", "--quiet", "--crf", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "3 panels (original, received, restored)" in result.output
    with av.open(str(clip)) as source:
        original = next(source.decode(video=0)).to_ndarray(format="gray")
    bar = 32  # the caption bar above the panels: a tenth of the height, at least 32 rows
    with av.open(str(out)) as written:
        first = next(written.decode(video=0))
        assert (first.width, first.height) == (3 * 160, bar + 128)
        luma = first.to_ndarray(format="gray")
    panels = [luma[:, i * 160 : (i + 1) * 160] for i in range(3)]
    # Every panel carries a caption: black with some white text.
    for panel in panels:
        assert np.median(panel[:bar]) <= 20 and panel[:bar].max() >= 200
    left, middle, right = (panel[bar:].astype(int) for panel in panels)
    # The original (the output is lossless here), then the call as received: CRF 42 really degraded it.
    assert np.abs(left - original).max() == 0
    assert np.abs(middle - original).mean() > 1.0
    # No face in the clip, so the restored call is the received one.
    assert np.abs(middle - right).max() <= 1


def test_compare_picks_the_panels_and_needs_an_original_for_one(tmp_path: Path) -> None:
    clip = write_synthetic_clip(tmp_path / "clip.mp4", frames=4, width=160, height=128)
    out = tmp_path / "two.mp4"
    result = CliRunner().invoke(
        app, ["restore", str(clip), str(out), "--degrade-crf", "42", "--compare", "original,restored", "-q"]
    )
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as written:
        assert written.streams.video[0].width == 2 * 160
    result = CliRunner().invoke(app, ["restore", str(clip), str(out), "--compare", "original,restored", "-q"])
    assert result.exit_code == 2 and "needs --degrade-crf" in result.output
    result = CliRunner().invoke(app, ["restore", str(clip), str(out), "--snapshot", "2", "-q"])
    assert result.exit_code == 2 and "a snapshot is written as a .png" in result.output


CHOICE_CODE = """
import sys
from kfgan_daemon.cli import app
try:
    app(sys.argv[1:], prog_name="kfgan-daemon")
except SystemExit as exc:
    print("exit", exc.code, "torch loaded" if "torch" in sys.modules else "torch not loaded")
"""


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["restore", "{clip}", "{out}", "--policy", "nonsense"], "--policy"),
        (["restore", "{clip}", "{out}", "--warp", "nonsense"], "--warp"),
        (["restore", "{clip}", "{out}", "--detector", "nonsense"], "--detector"),
        (["restore", "{clip}", "{out}", "--preset", "nonsense"], "--preset"),
        (["restore", "{clip}", "{out}", "--variant", "nonsense"], "--variant"),
        (["bench", "{clip}", "--policy", "nonsense"], "--policy"),
        (["bench", "{clip}", "--runtime", "nonsense"], "--runtime"),
        (["pipe", "--input", "{sdp}", "--output", "-", "--policy", "nonsense"], "--policy"),
        (["pipe", "--input", "{sdp}", "--output", "-", "--loss-policy", "nonsense"], "--loss-policy"),
    ],
)
def test_a_value_not_among_an_options_choices_exits_2_naming_it_before_anything_loads(
    tmp_path: Path, command: list[str], option: str
) -> None:
    files = {"clip": tmp_path / "in.mp4", "out": tmp_path / "out.mp4", "sdp": tmp_path / "in.sdp"}
    files["clip"].write_bytes(b"\0")
    files["sdp"].write_text("v=0\n")
    args = [part.format(**{name: str(path) for name, path in files.items()}) for part in command]
    done = subprocess.run([sys.executable, "-c", CHOICE_CODE, *args], capture_output=True, text=True, timeout=60)
    assert "exit 2 torch not loaded" in done.stdout, done.stdout + done.stderr
    assert f"Invalid value for '{option}'" in done.stderr and "nonsense" in done.stderr
    assert not files["out"].exists()
