"""Media layer: reading, tagging, encoding and sending video. Knows nothing about faces or models."""
from kfgan_daemon.media.bitstream import h264_access_unit_is_idr, vp8_is_keyframe
from kfgan_daemon.media.encode import encode_h264_file
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.sink import FileSink
from kfgan_daemon.media.source import FileSource
from kfgan_daemon.media.vcam import VirtualCameraSink
from kfgan_daemon.media.x264 import EncodeOptions
from kfgan_daemon.media.y4m import Y4MWriter

__all__ = [
    "DecodedFrame",
    "EncodeOptions",
    "FileSink",
    "FileSource",
    "VirtualCameraSink",
    "Y4MWriter",
    "encode_h264_file",
    "h264_access_unit_is_idr",
    "vp8_is_keyframe",
]
