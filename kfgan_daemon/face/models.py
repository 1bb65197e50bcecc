"""Where the dlib model files come from, and loading them once per process."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

from kfgan_daemon.errors import FaceModelError

SHAPE_PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
CNN_FACE_DETECTOR = "mmod_human_face_detector.dat"
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


def _load(kind: str, path: Path, loader):
    key = (kind, path.resolve())
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            try:
                model = loader(str(path))
            except RuntimeError as exc:
                raise FaceModelError(f"cannot load dlib model {path}: {exc}") from exc
            _cache[key] = model
    return model


def load_shape_predictor(path: str | Path | None = None):
    """The 68-point dlib shape predictor (shared by every caller in the process)."""
    import dlib

    return _load("shape_predictor", locate_dlib_model(SHAPE_PREDICTOR_68, path), dlib.shape_predictor)


def load_cnn_detector(path: str | Path | None = None):
    """A new dlib MMOD CNN face detector (dlib detectors are not safe to share across threads)."""
    import dlib

    model_path = locate_dlib_model(CNN_FACE_DETECTOR, path)
    try:
        return dlib.cnn_face_detection_model_v1(str(model_path))
    except RuntimeError as exc:
        raise FaceModelError(f"cannot load dlib model {model_path}: {exc}") from exc


def load_hog_detector():
    """A new dlib frontal HOG face detector (built in; not safe to share across threads)."""
    import dlib

    return dlib.get_frontal_face_detector()
