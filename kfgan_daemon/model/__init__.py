"""Generators (the published ``full`` one and our ``lite`` one), the discriminator, and their checkpoints."""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from kfgan_daemon.errors import ModelError
from kfgan_daemon.model.checkpoint import (
    Checkpoint,
    attach_native_detail,
    attach_quantiser_strength,
    load_weights,
    read_checkpoint,
    save_safetensors,
    unwrap_state_dict,
)
from kfgan_daemon.model.discriminator import MultiScaleDiscriminator
from kfgan_daemon.model.full import FullGenerator
from kfgan_daemon.model.guided import GuidedGenerator
from kfgan_daemon.model.lite import LiteGenerator

VARIANTS = ("full", "guided", "lite")


def _guess_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    # The published generator carries its own VGG-19; ours does not.
    return "full" if any(key.startswith("vgg_extractor.") for key in state_dict) else "lite"


def build_generator(variant: str, config: Mapping[str, object] | None = None) -> nn.Module:
    """An untrained generator of ``variant`` built with ``config`` keywords."""
    if variant == "lite":
        return LiteGenerator(**dict(config or {}))
    if variant == "guided":
        return GuidedGenerator(**dict(config or {}))
    if variant == "full":
        return FullGenerator(**dict(config or {}))
    raise ModelError(f"unknown generator variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def load_generator(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | Checkpoint,
    variant: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A generator in eval mode on ``device``, with weights from a checkpoint path, a checkpoint
    already read, or a state dict.

    ``variant`` defaults to what the file's metadata says, else to what its keys show.
    """
    if isinstance(source, Checkpoint):
        checkpoint, origin = source, "checkpoint"
    elif isinstance(source, Mapping):
        checkpoint = Checkpoint(unwrap_state_dict(source, "state dict"))
        origin = "state dict"
    else:
        checkpoint = read_checkpoint(source)
        origin = str(source)
    chosen = variant or checkpoint.variant or _guess_variant(checkpoint.state_dict)
    if checkpoint.variant is not None and variant is not None and variant != checkpoint.variant:
        raise ModelError(f"{origin} holds a {checkpoint.variant} generator, not {variant}")
    try:
        module = build_generator(chosen, checkpoint.config)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{origin}: its config does not fit the {chosen} generator ({exc})") from exc
    load_weights(module, checkpoint.state_dict, origin)
    return module.to(torch.device(device)).eval()


__all__ = [
    "VARIANTS",
    "Checkpoint",
    "attach_native_detail",
    "attach_quantiser_strength",
    "FullGenerator",
    "GuidedGenerator",
    "LiteGenerator",
    "MultiScaleDiscriminator",
    "build_generator",
    "load_generator",
    "load_weights",
    "read_checkpoint",
    "save_safetensors",
    "unwrap_state_dict",
]
