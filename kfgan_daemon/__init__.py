"""kfgan-daemon: keyframe-guided face restoration for videoconference streams."""

__version__ = "0.1.0"
