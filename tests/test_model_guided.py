"""The guided generator: the generators' contract, its checkpoint, and what its attention does."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kfgan_daemon.model import GuidedGenerator, build_generator, load_generator, save_safetensors
from kfgan_daemon.model.guided import LocalAttention


def _inputs(seed: int = 0, size: int = 64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, size, size, generator=generator) for _ in range(3)]


def test_an_untrained_generator_returns_its_input() -> None:
    model = GuidedGenerator(fine=8, coarse=16, blocks=1, key_channels=8).eval()
    compressed, reference, landmarks = _inputs()
    with torch.inference_mode():
        assert torch.equal(model(compressed, reference, landmarks), compressed)


def test_it_loads_from_safetensors_by_its_metadata(tmp_path: Path) -> None:
    model = build_generator("guided", {"fine": 8, "coarse": 16, "blocks": 2, "fine_blocks": 0, "window": 3})
    torch.nn.init.normal_(model.tail.weight, std=0.01)  # a non-trivial output
    path = save_safetensors(model, tmp_path / "guided.safetensors", "guided", model.config)
    loaded = load_generator(path)
    assert isinstance(loaded, GuidedGenerator) and loaded.config == model.config
    inputs = _inputs(1)
    with torch.inference_mode():
        assert torch.equal(loaded(*inputs), model.eval()(*inputs))


def test_attention_fetches_reference_features_from_where_they_are() -> None:
    # Identity projections and a sharp softmax: each position must pick the reference
    # feature that matches it, wherever it sits inside the window.
    attention = LocalAttention(channels=16, key_channels=16, window=5)
    with torch.no_grad():
        for conv in (attention.query, attention.key):
            conv.weight.copy_(torch.eye(16).view(16, 16, 1, 1))
            conv.bias.zero_()
        attention.log_temperature.fill_(5.0)
    features = torch.randn(1, 16, 16, 16)
    shifted = torch.roll(features, shifts=(2, -1), dims=(2, 3))  # 2 down, 1 left: inside the window
    attended, evidence = attention(features, shifted)
    inner = (slice(None), slice(None), slice(3, 13), slice(3, 13))
    assert torch.allclose(attended[inner], features[inner], atol=1e-2)
    assert evidence.shape == (1, 26, 16, 16)
    assert torch.allclose(evidence[:, -1][inner[0], inner[2], inner[3]], torch.ones(1, 10, 10), atol=1e-5)


def test_invalid_sizes_are_named() -> None:
    with pytest.raises(ValueError, match="window"):
        GuidedGenerator(window=4)
