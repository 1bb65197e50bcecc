"""Who a face is: dlib's 128-D face descriptor, computed from an aligned crop.

dlib's ResNet (``dlib_face_recognition_resnet_model_v1.dat``) maps a 150x150 face
chip to a descriptor in which two pictures of one person lie closer than 0.6
(Euclidean) and two people further apart; that is dlib's own convention. The chip
is cut from the already aligned 256x256 crop (cheap, no second look at the frame)
with the crop's landmarks, the way ``dlib.get_face_chip`` expects.
"""
from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import numpy as np

from kfgan_daemon.face.child import ModelProcess
from kfgan_daemon.face.models import face_recognizer_pool

SAME_PERSON_DISTANCE = 0.6

# Low enough that frames' work comes first when the cores are full, high enough that a
# descriptor still finishes within a few hundred milliseconds then (CFS gives nice 5
# about a third of nice 0's share).
DESCRIBER_NICENESS = 5
_CHIP_SIZE = 150
_CHIP_PADDING = 0.25


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two face descriptors (below 0.6: the same person)."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


class FaceDescriber:
    """Computes face descriptors with a network borrowed from the process's pool (dlib networks
    are not safe to call from several threads at once; loading one per stream would stall it)."""

    def __init__(self, model_path: str | Path | None = None) -> None:
        self.model_path = model_path

    def describe(self, crop_rgb: np.ndarray, crop_landmarks: np.ndarray) -> np.ndarray:
        """128-D float64 descriptor of the face in ``crop_rgb`` (HxWx3 uint8 RGB) with its 68 landmarks."""
        import dlib

        if crop_rgb.ndim != 3 or crop_rgb.shape[2] != 3 or crop_rgb.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB crop, got {crop_rgb.shape} {crop_rgb.dtype}")
        points = np.rint(np.asarray(crop_landmarks, dtype=np.float64)).astype(np.int64)
        if points.shape != (68, 2):
            raise ValueError(f"expected 68x2 landmarks, got shape {points.shape}")
        left, top = points.min(axis=0).tolist()
        right, bottom = points.max(axis=0).tolist()
        shape = dlib.full_object_detection(
            dlib.rectangle(left, top, right, bottom), [dlib.point(x, y) for x, y in points.tolist()]
        )
        chip = dlib.get_face_chip(np.ascontiguousarray(crop_rgb), shape, _CHIP_SIZE, _CHIP_PADDING)
        with face_recognizer_pool(self.model_path).borrow() as model:
            return np.array(model.compute_face_descriptor(chip), dtype=np.float64)

    def describe_async(self, crop_rgb: np.ndarray, crop_landmarks: np.ndarray) -> Future[np.ndarray]:
        """:meth:`describe`, computed now, as a finished future (the file path: the same answers in the
        same order every run)."""
        future: Future[np.ndarray] = Future()
        try:
            future.set_result(self.describe(crop_rgb, crop_landmarks))
        except Exception as exc:
            future.set_exception(exc)
        return future


class DescriberProcess:
    """Face descriptors computed in a child process at a lower CPU priority (``face.child``): a
    descriptor never holds this process's GIL, and frames' work comes first when the cores are full.
    Answers come back as futures, in request order."""

    def __init__(self, model_path: str | Path | None = None, niceness: int = DESCRIBER_NICENESS) -> None:
        self.model_path = model_path
        path = None if model_path is None else str(model_path)
        self._child = ModelProcess("kfgan_daemon.face.identity:warm_describer", (path,), niceness)

    def warm(self) -> None:
        """Start the child and load its network (seconds: call on a worker thread, before going live)."""
        self._child.warm()

    def describe_async(self, crop_rgb: np.ndarray, crop_landmarks: np.ndarray) -> Future[np.ndarray]:
        return self._child.submit("describe", np.ascontiguousarray(crop_rgb), np.asarray(crop_landmarks))

    def close(self) -> None:
        self._child.close()


def warm_describer(model_path: str | None) -> FaceDescriber:
    """A describer whose network has run once (the child process's model)."""
    describer = FaceDescriber(model_path)
    describer.describe(np.zeros((256, 256, 3), np.uint8), _WARM_LANDMARKS)
    return describer


# A plausible face's landmarks in a 256x256 crop, only to run the network once at start-up.
_WARM_LANDMARKS = np.column_stack([np.linspace(60, 196, 68), np.linspace(70, 200, 68)])
