"""Faces: detection, tracking, 68-point landmarks, alignment, MLS warp, landmark image, paste-back.

numpy, OpenCV and dlib only: no codecs, no torch.
"""
from kfgan_daemon.face.align import (
    ALIGNMENT_MODES,
    CROP_SIZE,
    AlignedFace,
    AlignmentMode,
    align_face,
    align_frame,
    alignment_matrix,
    crop_footprint,
    crop_landmarks,
    transform_points,
)
from kfgan_daemon.face.detector import DETECTOR_KINDS, FaceBox, FaceDetector
from kfgan_daemon.face.landmark_image import landmark_image
from kfgan_daemon.face.landmarks import LandmarkPredictor, shape_residual
from kfgan_daemon.face.mls import WARP_MODES, mls_displacement, mls_warp
from kfgan_daemon.face.models import CNN_FACE_DETECTOR, SHAPE_PREDICTOR_68, locate_dlib_model
from kfgan_daemon.face.paste import (
    MASK_SHAPES,
    PASTE_MODES,
    MaskShape,
    PasteMode,
    continuous_mask,
    paste_face,
    paste_weights,
    published_mask,
)
from kfgan_daemon.face.smoothing import LandmarkSmoother, OneEuroSettings
from kfgan_daemon.face.tracker import FaceTracker, LandmarkSource, TrackerStats

__all__ = [
    "ALIGNMENT_MODES",
    "CNN_FACE_DETECTOR",
    "CROP_SIZE",
    "DETECTOR_KINDS",
    "MASK_SHAPES",
    "PASTE_MODES",
    "SHAPE_PREDICTOR_68",
    "WARP_MODES",
    "AlignedFace",
    "AlignmentMode",
    "FaceBox",
    "FaceDetector",
    "FaceTracker",
    "LandmarkPredictor",
    "LandmarkSmoother",
    "LandmarkSource",
    "MaskShape",
    "PasteMode",
    "OneEuroSettings",
    "TrackerStats",
    "align_face",
    "align_frame",
    "alignment_matrix",
    "continuous_mask",
    "crop_footprint",
    "crop_landmarks",
    "landmark_image",
    "locate_dlib_model",
    "mls_displacement",
    "mls_warp",
    "paste_face",
    "paste_weights",
    "published_mask",
    "shape_residual",
    "transform_points",
]
