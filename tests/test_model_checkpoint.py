"""Checkpoint reading and writing: formats, variants, and the errors users see."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kfgan_daemon.errors import ModelError
from kfgan_daemon.model import FullGenerator, LiteGenerator, load_generator, read_checkpoint, save_safetensors


def _lite(seed: int = 0, small: bool = True) -> LiteGenerator:
    torch.manual_seed(seed)
    model = LiteGenerator(channels=8, blocks=1) if small else LiteGenerator()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    return tuple(torch.rand(1, 3, 256, 256) for _ in range(3))


def _same_output(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(a(*_inputs()), b(*_inputs()))


def test_safetensors_round_trip_rebuilds_the_architecture_from_metadata(tmp_path: Path) -> None:
    model = _lite()
    path = save_safetensors(model, tmp_path / "m.safetensors", variant="lite", config=model.config)
    checkpoint = read_checkpoint(path)
    assert checkpoint.variant == "lite" and checkpoint.config == model.config
    loaded = load_generator(path)
    assert isinstance(loaded, LiteGenerator) and not loaded.training
    _same_output(model, loaded)


def test_half_precision_export_loads_into_float32(tmp_path: Path) -> None:
    model = _lite()
    path = save_safetensors(model, tmp_path / "m16.safetensors", variant="lite", config=model.config, half=True)
    loaded = load_generator(path)
    assert next(loaded.parameters()).dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(model(*_inputs()), loaded(*_inputs()), atol=2e-3, rtol=0)


def test_published_layout_loads_with_weights_only(tmp_path: Path) -> None:
    model = _lite(3, small=False)  # a .pth carries no config: the default architecture
    path = tmp_path / "net_g.pth"
    torch.save({"params": model.state_dict()}, path)
    loaded = load_generator(path, variant="lite")
    _same_output(model, loaded)


def test_state_dict_source_is_accepted() -> None:
    model = _lite(4, small=False)
    loaded = load_generator({"params": model.state_dict()}, variant="lite")
    _same_output(model, loaded)


class Payload:
    """Any class: unpickling it would run code from the file."""


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"params": Payload()}, path)
    with pytest.raises(ModelError, match="weights-only"):
        load_generator(path, variant="lite")


def test_missing_file_says_where_to_get_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="net_g_55000.pth"):
        load_generator(tmp_path / "nope.pth")


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00not a model at all" * 10)
    with pytest.raises(ModelError, match="garbage.safetensors"):
        load_generator(path)


def test_wrong_keys_are_listed(tmp_path: Path) -> None:
    state = _lite(small=False).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state[next(iter(state))]
    with pytest.raises(ModelError, match=r"1 missing .*1 unexpected"):
        load_generator(state, variant="lite")


def test_variant_conflict_with_metadata(tmp_path: Path) -> None:
    model = _lite()
    path = save_safetensors(model, tmp_path / "m.safetensors", variant="lite", config=model.config)
    with pytest.raises(ModelError, match="not full"):
        load_generator(path, variant="full")


# -- the published full generator ---------------------------------------------------------------


@pytest.fixture(scope="module")
def full_state() -> dict[str, torch.Tensor]:
    """A FullGenerator state dict with random small weights, as a stand-in for net_g_55000.pth."""
    torch.manual_seed(5)
    model = FullGenerator()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.01)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_full_weights(loaded: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    assert isinstance(loaded, FullGenerator) and not loaded.training
    state = loaded.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("wrapper", ["params_ema", None])
def test_other_published_wrappers_are_accepted(tmp_path: Path, wrapper: str | None) -> None:
    model = _lite(6, small=False)
    path = tmp_path / "net_g.pth"
    torch.save(model.state_dict() if wrapper is None else {wrapper: model.state_dict()}, path)
    _same_output(model, load_generator(path, variant="lite"))


@pytest.mark.slow
def test_published_full_checkpoint_loads_strictly(tmp_path: Path, full_state: dict) -> None:
    path = tmp_path / "net_g_55000.pth"
    torch.save({"params": full_state}, path)
    # The file is plain tensors: the weights-only unpickler accepts it as is.
    torch.load(path, map_location="cpu", weights_only=True)
    _assert_full_weights(load_generator(path), full_state)  # variant guessed from the keys


@pytest.mark.slow
def test_full_safetensors_round_trip(tmp_path: Path, full_state: dict) -> None:
    model = FullGenerator()
    model.load_state_dict(full_state)
    path = save_safetensors(model, tmp_path / "full.safetensors", variant="full", config=model.config)
    assert read_checkpoint(path).variant == "full"
    _assert_full_weights(load_generator(path), full_state)


def test_full_state_dict_source(full_state: dict) -> None:
    _assert_full_weights(load_generator({"params": full_state}, variant="full"), full_state)


def test_full_checkpoint_with_wrong_keys_names_them(full_state: dict) -> None:
    state = dict(full_state)
    state["upsample4.5.weight"] = torch.zeros(3)
    del state["MASFF_blocks.0.compressed_conv2.bias"]
    with pytest.raises(ModelError, match=r"MASFF_blocks\.0\.compressed_conv2\.bias.*upsample4\.5\.weight"):
        load_generator(state, variant="full")


def test_lite_weights_do_not_load_as_full() -> None:
    with pytest.raises(ModelError, match="does not fit FullGenerator"):
        load_generator(_lite(small=False).state_dict(), variant="full")


def test_a_non_checkpoint_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ModelError, match="not a state dict"):
        load_generator(path)
