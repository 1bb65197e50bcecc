"""LPIPS from user-given weight files, checked with random weights in the published file layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kfgan_daemon.errors import MetricUnavailableError
from kfgan_daemon.eval.lpips import Lpips, LpipsWeights


def write_random_lpips_weights(folder, net: str = "alex", seed: int = 0) -> LpipsWeights:
    """A backbone in torchvision's key layout and LPIPS heads in the release's layout, random but fixed."""
    torch.manual_seed(seed)
    model = Lpips(net)
    backbone = {f"features.{k}": v.clone() for k, v in model.features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
    heads = {f"lin{i}.model.1.weight": torch.rand_like(h.weight) for i, h in enumerate(model.heads)}
    paths = LpipsWeights(folder / f"{net}-backbone.pth", folder / f"{net}.pth", net)  # type: ignore[arg-type]
    torch.save(backbone, paths.backbone)
    torch.save(heads, paths.heads)
    return paths


def _images(seed: int, noise: float, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    clean = np.stack([(x * 3) % 256, (y * 2) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    noisy = np.clip(clean + rng.normal(0, noise, clean.shape), 0, 255).astype(np.uint8)
    return clean, noisy


@pytest.fixture(scope="module")
def alex(tmp_path_factory) -> Lpips:
    return Lpips.from_files(write_random_lpips_weights(tmp_path_factory.mktemp("lpips")))


def test_identical_images_are_at_distance_zero(alex):
    clean, _ = _images(0, 0)
    assert alex.distance(clean, clean.copy()) == [pytest.approx(0.0, abs=1e-9)]


def test_distance_grows_with_noise_and_is_symmetric(alex):
    clean, light = _images(1, 4)
    _, heavy = _images(2, 40)
    (d_light,), (d_heavy,) = alex.distance(clean, light), alex.distance(clean, heavy)
    assert 0 < d_light < d_heavy
    assert alex.distance(light, clean) == [pytest.approx(d_light, rel=1e-5)]


def test_a_batch_gives_the_same_distances_as_single_pairs(alex):
    clean, light = _images(3, 4)
    _, heavy = _images(4, 40)
    batch = alex.distance([clean, clean], [light, heavy])
    assert batch == pytest.approx(alex.distance(clean, light) + alex.distance(clean, heavy), rel=1e-5)


def test_loaded_weights_are_the_files_weights(tmp_path):
    paths = write_random_lpips_weights(tmp_path, seed=5)
    model = Lpips.from_files(paths)
    saved = torch.load(paths.backbone, weights_only=True)
    assert torch.equal(model.features[0].weight, saved["features.0.weight"])
    assert torch.equal(model.heads[4].weight, torch.load(paths.heads, weights_only=True)["lin4.model.1.weight"])


def test_vgg_layout_loads(tmp_path):
    model = Lpips.from_files(write_random_lpips_weights(tmp_path, net="vgg"))
    assert [h.weight.shape[1] for h in model.heads] == [64, 128, 256, 512, 512]
    clean, light = _images(6, 10, size=48)
    assert model.distance(clean, light)[0] > 0


def test_missing_or_mismatched_weights_say_what_is_wrong(tmp_path):
    paths = write_random_lpips_weights(tmp_path)
    with pytest.raises(MetricUnavailableError, match="do not exist"):
        Lpips.from_files(LpipsWeights(tmp_path / "none.pth", paths.heads))
    torch.save({"lin0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(MetricUnavailableError, match="lin0.model.1.weight"):
        Lpips.from_files(LpipsWeights(paths.backbone, tmp_path / "bad.pth"))
    with pytest.raises(MetricUnavailableError, match="vgg layout"):
        Lpips.from_files(LpipsWeights(paths.backbone, paths.heads, "vgg"))
