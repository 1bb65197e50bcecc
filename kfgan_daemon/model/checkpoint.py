"""Reading and writing generator weights without executing pickled code.

Two formats: the published checkpoint (``net_g_55000.pth``, a torch file whose
``params`` entry is the generator's state dict), read with
``torch.load(weights_only=True)``; and ours, a ``.safetensors`` file whose
metadata names the architecture (``variant``) and its constructor keywords
(``config``, JSON). Ours may also hold a native detail filter for the paste
(tensors under ``native_detail.``, see :mod:`kfgan_daemon.face.native_detail`) and a
gain on its correction by the frame's quantiser (tensors under ``quantiser_strength.``,
see :mod:`kfgan_daemon.model.quantiser_strength`), both kept apart from the generator's
state dict, a ``reference_flow`` entry that says how its keyframe is to be refined
(:mod:`kfgan_daemon.face.reference_flow`), and a ``face_settings`` entry (JSON) that
records how its training faces were cut (:func:`kfgan_daemon.restore.face_pipeline.face_record`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kfgan_daemon.errors import ModelError
from kfgan_daemon.face import native_detail as detail
from kfgan_daemon.face.native_detail import NativeDetailFilter
from kfgan_daemon.face.reference_flow import check_reference_flow
from kfgan_daemon.model import quantiser_strength as strength
from kfgan_daemon.model.quantiser_strength import QuantiserStrength

REFERENCE_FLOW_KEY = "reference_flow"
FACE_SETTINGS_KEY = "face_settings"

PUBLISHED_KEYS = ("params", "params_ema", "state_dict")
PUBLISHED_HINT = (
    "the published checkpoint is net_g_55000.pth, linked from the authors' Keyframes-GAN README "
    "(see models/README.md)"
)


@dataclass(slots=True)
class Checkpoint:
    """A state dict and what the file says about it."""

    state_dict: dict[str, torch.Tensor]
    variant: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    native_detail: NativeDetailFilter | None = None
    # How the model expects its warped keyframe refined (see face.reference_flow); None: as warped.
    reference_flow: str | None = None
    quantiser_strength: QuantiserStrength | None = None
    # The face settings its training faces were cut with (None: not recorded, e.g. the published file).
    face_settings: dict[str, Any] | None = None


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read ``path`` (.safetensors, or a torch file in the published layout) into a :class:`Checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint; {PUBLISHED_HINT}, or use models/kfgan-guided.safetensors")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from exc
    config = _json_metadata(metadata, "config", path) or {}
    extra = {
        key: tensors.pop(key).numpy()
        for key in [k for k in tensors if k.startswith((detail.TENSOR_PREFIX, strength.TENSOR_PREFIX))]
    }
    return Checkpoint(
        tensors, metadata.get("variant"), config, NativeDetailFilter.from_tensors(extra, str(path)),
        check_reference_flow(metadata.get(REFERENCE_FLOW_KEY), str(path)),
        QuantiserStrength.from_tensors(extra, str(path)), _json_metadata(metadata, FACE_SETTINGS_KEY, path),
    )


def _json_metadata(metadata: Mapping[str, str], key: str, path: Path) -> Any:
    """The JSON value under ``key`` (None: absent)."""
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: its {key!r} metadata is not JSON ({exc})") from exc


def _read_torch(path: Path) -> Checkpoint:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises unrelated types (pickle, zip, runtime) for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a weights-only torch checkpoint ({reason})") from exc
    return Checkpoint(unwrap_state_dict(payload, str(path)))


def unwrap_state_dict(payload: object, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The generator's state dict from the published layout ({"params": sd}), its EMA twin, or a bare one."""
    if not isinstance(payload, Mapping):
        raise ModelError(f"{origin}: holds a {type(payload).__name__}, not a state dict")
    for key in PUBLISHED_KEYS:
        if key in payload and isinstance(payload[key], Mapping):
            payload = payload[key]
            break
    if not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ModelError(f"{origin}: no tensors found under {', '.join(PUBLISHED_KEYS)} or at the top level")
    return dict(payload)


def load_weights(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str, fresh: tuple[str, ...] = ()
) -> None:
    """Strict load with a message that lists what does not fit.

    Tensors under the ``fresh`` name prefixes may be absent; they keep their initial values.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not (fresh and k.startswith(fresh))]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    if problems:
        raise ModelError(f"{origin} does not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=not fresh)


def save_safetensors(
    module: nn.Module,
    path: str | os.PathLike[str],
    variant: str,
    config: Mapping[str, Any] | None = None,
    half: bool = False,
    reference_flow: str | None = None,
    face_settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``module``'s weights as .safetensors with {"variant", "config"} metadata, atomically;
    ``reference_flow`` records how the model was trained to have its keyframe refined,
    ``face_settings`` how its training faces were cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in module.state_dict().items():
        value = value.detach().to("cpu")
        if half and value.is_floating_point():
            value = value.half()
        tensors[key] = value.contiguous()
    metadata = {"variant": variant, "config": json.dumps(dict(config or {}), sort_keys=True)}
    if check_reference_flow(reference_flow, str(path)) is not None:
        metadata[REFERENCE_FLOW_KEY] = reference_flow
    if face_settings is not None:
        metadata[FACE_SETTINGS_KEY] = json.dumps(dict(face_settings), sort_keys=True)
    return _write_safetensors(tensors, metadata, path)


def _write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> Path:
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.chmod(partial, 0o644)  # shipped weights must be readable by the service's own user
    os.replace(partial, path)
    return path


def attach_native_detail(
    path: str | os.PathLike[str], native_detail: NativeDetailFilter, description: Mapping[str, Any]
) -> Path:
    """Store ``native_detail`` in the .safetensors model at ``path`` (replacing any filter it had),
    with ``description`` (how it was fitted, JSON) in its metadata, atomically."""
    return _attach(
        path, "a native detail filter", detail.TENSOR_PREFIX, native_detail.to_tensors(), detail.METADATA_KEY,
        description,
    )


def attach_quantiser_strength(
    path: str | os.PathLike[str], quantiser_strength: QuantiserStrength, description: Mapping[str, Any]
) -> Path:
    """Store ``quantiser_strength`` in the .safetensors model at ``path`` (replacing any it had),
    with ``description`` (how it was fitted, JSON) in its metadata, atomically."""
    return _attach(
        path, "a quantiser strength", strength.TENSOR_PREFIX, quantiser_strength.to_tensors(), strength.METADATA_KEY,
        description,
    )


def _attach(
    path: str | os.PathLike[str], what: str, prefix: str, arrays: Mapping[str, Any], metadata_key: str,
    description: Mapping[str, Any],
) -> Path:
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: {what} is stored in our .safetensors models only")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith(prefix)}
    tensors.update({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    metadata[metadata_key] = json.dumps(dict(description), sort_keys=True)
    return _write_safetensors(tensors, metadata, path)
