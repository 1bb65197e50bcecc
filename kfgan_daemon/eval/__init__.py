"""Quality evaluation: compress clips, restore them, and measure PSNR/SSIM (and VMAF when installed)."""
from kfgan_daemon.eval.evaluate import ModelSpec, evaluate, parse_model_option, write_report
from kfgan_daemon.eval.image_quality import psnr, ssim
from kfgan_daemon.eval.report import ClipResult, EvalReport, RowResult

__all__ = [
    "ClipResult",
    "EvalReport",
    "ModelSpec",
    "RowResult",
    "evaluate",
    "parse_model_option",
    "psnr",
    "ssim",
    "write_report",
]
