"""Face detection with dlib (HOG by default, the MMOD CNN as an option) on a downscaled image."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import cv2
import numpy as np

from kfgan_daemon.face.child import ModelProcess
from kfgan_daemon.face.models import cnn_detector_pool, hog_detector_pool, load_cnn_detector, load_hog_detector

DetectorKind = Literal["hog", "cnn"]
DETECTOR_KINDS: tuple[str, ...] = get_args(DetectorKind)


@dataclass(frozen=True)
class FaceBox:
    """An axis-aligned face box in image coordinates (right and bottom exclusive)."""

    left: float
    top: float
    right: float
    bottom: float
    score: float = 0.0

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return (self.left + self.right) / 2.0, (self.top + self.bottom) / 2.0

    def iou(self, other: FaceBox) -> float:
        inter_w = min(self.right, other.right) - max(self.left, other.left)
        inter_h = min(self.bottom, other.bottom) - max(self.top, other.top)
        if inter_w <= 0 or inter_h <= 0:
            return 0.0
        inter = inter_w * inter_h
        return inter / (self.area + other.area - inter)

    def to_dlib(self):
        import dlib

        return dlib.rectangle(
            int(round(self.left)), int(round(self.top)), int(round(self.right)) - 1, int(round(self.bottom)) - 1
        )


class FaceDetector:
    """dlib face detector that runs on a downscaled copy of (a region of) a grayscale image.

    `upsample` is dlib's own pyramid upsampling (0 by default for HOG; 1 for the CNN,
    as the published pipeline used it). dlib detectors keep scratch state and must not
    serve two threads at once, so each detection borrows one from the process's pool
    (see `face.models.ModelPool`): making a FaceDetector costs nothing.

    With a ``full_frame`` process, whole-frame searches (a face to find afresh: about
    100 ms at 720p, holding the GIL) run in that child instead, the calling thread
    waiting without the GIL; searches near a followed face (about 5 ms) stay here.
    """

    def __init__(
        self,
        kind: DetectorKind = "hog",
        path: str | Path | None = None,
        upsample: int | None = None,
        full_frame: DetectorProcess | None = None,
    ):
        if full_frame is not None and (full_frame.kind, full_frame.path) != (kind, path):
            raise ValueError(f"the full-frame detector process runs {full_frame.kind!r}, not {kind!r} from {path}")
        self.kind = kind
        self.upsample = (1 if kind == "cnn" else 0) if upsample is None else int(upsample)
        self._pool = cnn_detector_pool(path) if kind == "cnn" else hog_detector_pool()
        self._full_frame = full_frame

    def detect(
        self,
        gray: np.ndarray,
        scale: float = 1.0,
        region: tuple[int, int, int, int] | None = None,
    ) -> list[FaceBox]:
        """Faces in `gray` (HxW uint8), optionally only inside region (x0, y0, x1, y1).

        The image (or region) is resized by `scale` before detection; boxes come back
        in the coordinates of `gray`.
        """
        x0, y0 = 0, 0
        image = gray
        if region is not None:
            x0, y0, x1, y1 = region
            image = gray[y0:y1, x0:x1]
        if image.size == 0:
            return []
        back_x = back_y = 1.0
        if scale != 1.0:
            width = max(int(round(image.shape[1] * scale)), 1)
            height = max(int(round(image.shape[0] * scale)), 1)
            back_x, back_y = image.shape[1] / width, image.shape[0] / height
            interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
            image = cv2.resize(image, (width, height), interpolation=interpolation)
        image = np.ascontiguousarray(image)
        if region is None and self._full_frame is not None:
            found = self._full_frame.run(image, self.upsample)
        else:
            with self._pool.borrow() as detector:
                found = _run(self.kind, detector, image, self.upsample)
        return [
            FaceBox(left * back_x + x0, top * back_y + y0, right * back_x + x0, bottom * back_y + y0, score)
            for left, top, right, bottom, score in found
        ]


# (left, top, right, bottom, score) in the detected image's pixels, right and bottom exclusive
Detection = tuple[int, int, int, int, float]


def _run(kind: DetectorKind, detector: Any, image: np.ndarray, upsample: int) -> list[Detection]:
    if kind == "cnn":
        found = [(d.rect, float(d.confidence)) for d in detector(image, upsample)]
    else:
        rects, scores, _ = detector.run(image, upsample, 0.0)
        found = list(zip(rects, (float(s) for s in scores)))
    return [(r.left(), r.top(), r.right() + 1, r.bottom() + 1, score) for r, score in found]


class DetectorProcess:
    """Face detection in a child process (``face.child``), for whole-frame searches: the caller waits
    for the answer, but without holding the GIL, so the daemon's other threads run meanwhile."""

    def __init__(self, kind: DetectorKind = "hog", path: str | Path | None = None) -> None:
        self.kind = kind
        self.path = path
        self._child = ModelProcess(
            "kfgan_daemon.face.detector:ChildDetector", (kind, None if path is None else str(path))
        )

    def warm(self) -> None:
        self._child.warm()

    def run(self, image: np.ndarray, upsample: int) -> list[Detection]:
        return self._child.submit("run", image, upsample).result()

    def close(self) -> None:
        self._child.close()


class ChildDetector:
    """One dlib detector, the child process's model (see :class:`DetectorProcess`)."""

    def __init__(self, kind: DetectorKind, path: str | None) -> None:
        self.kind = kind
        self.detector = load_cnn_detector(path) if kind == "cnn" else load_hog_detector()

    def run(self, image: np.ndarray, upsample: int) -> list[Detection]:
        return _run(self.kind, self.detector, image, upsample)
