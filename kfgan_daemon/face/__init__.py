"""Faces: detection, tracking, 68-point landmarks, alignment, MLS warp, landmark image, paste-back.

numpy, OpenCV and dlib only: no codecs, no torch.
"""
from kfgan_daemon.face.align import (
    CROP_SIZE,
    AlignedFace,
    align_face,
    alignment_matrix,
    crop_landmarks,
    transform_points,
)
from kfgan_daemon.face.detector import DETECTOR_KINDS, FaceBox, FaceDetector
from kfgan_daemon.face.landmark_image import landmark_image
from kfgan_daemon.face.landmarks import LandmarkPredictor, shape_residual
from kfgan_daemon.face.mls import WARP_MODES, mls_displacement, mls_warp
from kfgan_daemon.face.models import CNN_FACE_DETECTOR, SHAPE_PREDICTOR_68, locate_dlib_model
from kfgan_daemon.face.paste import paste_back
from kfgan_daemon.face.tracker import FaceTracker, TrackerStats

__all__ = [
    "CNN_FACE_DETECTOR",
    "CROP_SIZE",
    "DETECTOR_KINDS",
    "SHAPE_PREDICTOR_68",
    "WARP_MODES",
    "AlignedFace",
    "FaceBox",
    "FaceDetector",
    "FaceTracker",
    "LandmarkPredictor",
    "TrackerStats",
    "align_face",
    "alignment_matrix",
    "crop_landmarks",
    "landmark_image",
    "locate_dlib_model",
    "mls_displacement",
    "mls_warp",
    "paste_back",
    "shape_residual",
    "transform_points",
]
