"""Where the dlib model files come from, and loading them once per process.

The shape predictor is shared outright (stateless when called). Detectors and
the face recognition network keep scratch state and must not serve two threads
at once, so they live in :class:`ModelPool` objects: a thread borrows one, builds one
only when every built one is busy, and gives it back. A process with N threads
doing face work builds at most N of each, once: a stream opening never pays
for a detector (a quarter of a second for dlib's HOG one).
"""
from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

from kfgan_daemon.errors import FaceModelError

SHAPE_PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
CNN_FACE_DETECTOR = "mmod_human_face_detector.dat"
FACE_RECOGNITION_RESNET = "dlib_face_recognition_resnet_model_v1.dat"
_PACKAGE = "face_recognition_models"

# Only the shape predictor is shared: it is large (100 MB) and stateless when called.
_cache: dict[tuple[str, Path], object] = {}
_cache_lock = threading.Lock()


def _package_models_dir() -> Path | None:
    # find_spec locates the package without importing it: its __init__ imports
    # pkg_resources, which recent setuptools no longer ship.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        models = Path(location) / "models"
        if models.is_dir():
            return models
    return None


def locate_dlib_model(name: str, explicit: str | Path | None = None) -> Path:
    """Path of the dlib model file `name` (e.g. "shape_predictor_68_face_landmarks.dat").

    An explicit path wins and must exist; otherwise the file is taken from the
    face_recognition_models package.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FaceModelError(f"dlib model file not found: {path} (pass the path of {name})")
        return path
    models = _package_models_dir()
    if models is None:
        raise FaceModelError(
            f"dlib model {name} not available: install the face_recognition_models package "
            f"(pip install face_recognition_models) or pass the path of {name}"
        )
    path = models / name
    if not path.is_file():
        raise FaceModelError(
            f"dlib model {name} is not in {models}: reinstall face_recognition_models or pass the path of {name}"
        )
    return path


def _build(path: Path, loader):
    try:
        return loader(str(path))
    except RuntimeError as exc:
        raise FaceModelError(f"cannot load dlib model {path}: {exc}") from exc


def _load(kind: str, path: Path, loader):
    key = (kind, path.resolve())
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            model = _cache[key] = _build(path, loader)
    return model


T = TypeVar("T")


class ModelPool(Generic[T]):
    """Reusable instances of a model that one thread at a time may use; thread-safe."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._free: list[T] = []
        self._lock = threading.Lock()
        self.built = 0

    @contextmanager
    def borrow(self) -> Iterator[T]:
        with self._lock:
            model = self._free.pop() if self._free else None
        if model is None:
            model = self._build()  # outside the lock: other threads keep borrowing meanwhile
            with self._lock:
                self.built += 1
        try:
            yield model
        finally:
            with self._lock:
                self._free.append(model)

    def warm(self, count: int = 1) -> None:
        """Build instances now until ``count`` exist.

        dlib holds the GIL while it builds a detector (a quarter of a second for
        HOG), which stalls every other thread, the event loop included: build as
        many as there are face threads once, before calls are live.
        """
        while True:
            with self._lock:
                if self.built >= count:
                    return
                self.built += 1
            model = self._build()
            with self._lock:
                self._free.append(model)


_pools: dict[tuple[str, Path | None], ModelPool] = {}


def _pool(kind: str, path: Path | None, build: Callable[[], T]) -> ModelPool[T]:
    key = (kind, None if path is None else path.resolve())
    with _cache_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ModelPool(build)
    return pool


def hog_detector_pool() -> ModelPool:
    """The process's pool of dlib frontal HOG face detectors."""
    return _pool("hog", None, load_hog_detector)


def cnn_detector_pool(path: str | Path | None = None) -> ModelPool:
    """The process's pool of dlib MMOD CNN face detectors for the model file at ``path``."""
    model_path = locate_dlib_model(CNN_FACE_DETECTOR, path)
    return _pool("cnn", model_path, lambda: load_cnn_detector(model_path))


def face_recognizer_pool(path: str | Path | None = None) -> ModelPool:
    """The process's pool of dlib face recognition networks for the model file at ``path``."""
    model_path = locate_dlib_model(FACE_RECOGNITION_RESNET, path)
    return _pool("face_recognizer", model_path, lambda: load_face_recognizer(model_path))


def warm_face_models(
    detector: str = "hog",
    copies: int = 1,
    *,
    predictor_path: str | Path | None = None,
    detector_path: str | Path | None = None,
    recognizer_path: str | Path | None = None,
    recognizer: bool = True,
) -> None:
    """Load the shape predictor and build ``copies`` detectors (and face recognisers): one per thread
    that will do face work at once. Call on a worker thread, before streams are live."""
    load_shape_predictor(predictor_path)
    pool = cnn_detector_pool(detector_path) if detector == "cnn" else hog_detector_pool()
    pool.warm(copies)
    if recognizer:
        face_recognizer_pool(recognizer_path).warm(copies)


def load_shape_predictor(path: str | Path | None = None):
    """The 68-point dlib shape predictor (shared by every caller in the process)."""
    import dlib

    return _load("shape_predictor", locate_dlib_model(SHAPE_PREDICTOR_68, path), dlib.shape_predictor)


def load_cnn_detector(path: str | Path | None = None):
    """A new dlib MMOD CNN face detector (dlib detectors are not safe to share across threads)."""
    import dlib

    return _build(locate_dlib_model(CNN_FACE_DETECTOR, path), dlib.cnn_face_detection_model_v1)


def load_face_recognizer(path: str | Path | None = None):
    """A new dlib ResNet face recognition model (a dlib DNN: not safe to share across threads)."""
    import dlib

    return _build(locate_dlib_model(FACE_RECOGNITION_RESNET, path), dlib.face_recognition_model_v1)


def load_hog_detector():
    """A new dlib frontal HOG face detector (built in; not safe to share across threads)."""
    import dlib

    return dlib.get_frontal_face_detector()
