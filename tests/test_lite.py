"""The lite generator: interface, starting point, cost, and the shipped weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kfgan_daemon.model.lite import LiteGenerator

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "kfgan-lite.safetensors"
# Multiply-accumulates per 256x256 crop: what the 25 ms budget on 2 CPU cores allows
# (about 20 GMAC/s measured for these convolutions).
MAC_BUDGET = 0.55e9


def _inputs(n: int = 2, size: int = 256, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, size, size, generator=g) for _ in range(3)]


def test_same_interface_as_the_full_model() -> None:
    model = LiteGenerator().eval()
    compressed, reference, landmarks = _inputs()
    with torch.inference_mode():
        out = model(compressed, reference, landmarks)
    assert out.shape == compressed.shape and out.dtype == torch.float32


def test_starts_as_the_identity() -> None:
    model = LiteGenerator().eval()
    compressed, reference, landmarks = _inputs()
    with torch.inference_mode():
        assert torch.equal(model(compressed, reference, landmarks), compressed)


def test_rebuilds_from_its_config() -> None:
    model = LiteGenerator(channels=16, blocks=2)
    config = json.loads(json.dumps(model.config))
    twin = LiteGenerator(**config)
    twin.load_state_dict(model.state_dict())
    assert config == {"channels": 16, "blocks": 2, "fusion_blocks": 1, "unshuffle": 4}
    with pytest.raises(ValueError):
        LiteGenerator(channels=0)


def test_reference_and_landmarks_reach_the_output() -> None:
    torch.manual_seed(0)
    model = LiteGenerator().eval()
    nn.init.normal_(model.tail.weight, std=0.01)  # a trained-like, non-zero output layer
    compressed, reference, landmarks = _inputs(n=1)
    with torch.inference_mode():
        base = model(compressed, reference, landmarks)
        assert not torch.equal(base, model(compressed, torch.zeros_like(reference), landmarks))
        assert not torch.equal(base, model(compressed, reference, torch.zeros_like(landmarks)))


def test_cost_fits_the_cpu_budget() -> None:
    model = LiteGenerator().eval()
    macs = 0

    def count(module: nn.Conv2d, inputs, output) -> None:
        nonlocal macs
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        macs += output.numel() * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        model(*_inputs(n=1))
    for hook in hooks:
        hook.remove()
    assert 0 < macs <= MAC_BUDGET
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def _shipped() -> LiteGenerator:
    """The shipped weights, read straight from the file (tensors + variant/config metadata)."""
    from safetensors import safe_open

    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} not present")
    with safe_open(str(SHIPPED), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}
    assert metadata["variant"] == "lite"
    model = LiteGenerator(**json.loads(metadata["config"]))
    model.load_state_dict(tensors)
    return model.eval()


def test_shipped_model_is_small_and_complete() -> None:
    model = _shipped()
    assert SHIPPED.stat().st_size < 20 * 1024 * 1024
    assert not torch.equal(model.tail.weight, torch.zeros_like(model.tail.weight))  # trained, not the identity


def test_shipped_model_opens_through_the_model_loader() -> None:
    model_package = pytest.importorskip("kfgan_daemon.model")
    if not hasattr(model_package, "load_generator"):
        pytest.skip("kfgan_daemon.model.load_generator is not there yet")
    loaded = model_package.load_generator(SHIPPED, variant="lite", device="cpu")
    expected = _shipped()
    inputs = _inputs(n=1)
    with torch.inference_mode():
        assert torch.allclose(loaded(*inputs), expected(*inputs), atol=1e-5)
    assert not loaded.training


@pytest.mark.shared
def test_shipped_model_improves_a_held_out_face(official_fixture: dict) -> None:
    # The fixture is frame 40 of d12 at CRF 42, a clip the shipped model never trained on.
    model = _shipped()

    def tensor(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image[..., ::-1])).permute(2, 0, 1)[None].float() / 255

    compressed = tensor(official_fixture["crop_compressed_target"])
    reference = tensor(official_fixture["warped_reference"])
    landmarks = tensor(official_fixture["landmark_image"])
    target = tensor(official_fixture["crop_original_target"])
    with torch.inference_mode():
        restored = model(compressed, reference, landmarks).clamp(0, 1)

    def psnr(x: torch.Tensor) -> float:
        return float(10 * torch.log10(1 / ((x - target) ** 2).mean()))

    assert psnr(restored) > psnr(compressed) + 0.3
