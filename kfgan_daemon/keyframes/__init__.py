"""The keyframe set: stored aligned crops of I-frames and the policy that keeps them."""
from kfgan_daemon.keyframes.store import KEYFRAME_POLICIES, KeyframeEntry, KeyframePolicy, KeyframeStore

__all__ = ["KEYFRAME_POLICIES", "KeyframeEntry", "KeyframePolicy", "KeyframeStore"]
