"""Trainer: a step learns, checkpoints resume bit-exactly, the config is validated."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kfgan_daemon.errors import ConfigError, InputError, ModelError
from kfgan_daemon.train import dataset as ds
from kfgan_daemon.train.config import load_config, parse_config
from kfgan_daemon.train.samples import SampleSet
from kfgan_daemon.train.trainer import LAST_CHECKPOINT, METRICS_LOG, Trainer, train

ROOT = Path(__file__).resolve().parent.parent


def _synthetic_video(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Blocky 'faces' as targets, a brighter quantised copy as input, a shifted copy as reference."""
    small = rng.integers(0, 256, size=(count, 16, 16, 3)).astype(np.float32)
    target = np.stack([np.kron(im, np.ones((16, 16, 1), np.float32)) for im in small])
    target = (target * 0.6 + 50).astype(np.uint8)
    compressed = (np.round(target / 8.0) * 8 + 24).clip(0, 255).astype(np.uint8)
    reference = np.roll(target, 2, axis=2)
    landmarks = rng.integers(40, 216, size=(count, 68, 2)).astype(np.int16)
    frame_index = np.arange(5, 5 + 5 * count, 5, dtype=np.int32)
    return {
        ds.COMPRESSED: compressed,
        ds.REFERENCE_HQ: reference,
        ds.REFERENCE_STREAM: np.roll(compressed, 2, axis=2),
        ds.TARGET: target,
        ds.CROP_LANDMARKS: landmarks,
        ds.FRAME_LANDMARKS: landmarks.astype(np.float64),
        ds.MATRIX: np.tile(np.eye(2, 3), (count, 1, 1)),
        ds.FRAME_INDEX: frame_index,
        ds.KEY_INDEX: np.zeros(count, dtype=np.int32),
    }


def write_synthetic_dataset(out: Path, videos: dict[str, str], count: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    manifest = ds.DatasetManifest(options={}, splits=dict(videos))
    for video, split in videos.items():
        name = ds.sample_file_name(video, 42)
        np.savez(out / name, **_synthetic_video(rng, count))
        manifest.files[name] = {"video": video, "crf": 42, "split": split, "samples": count}
    manifest.write(out)
    return out


def _config(tmp_path: Path, **overrides) -> dict:
    data = write_synthetic_dataset(tmp_path / "data", {"a": "train", "b": "train", "c": "validation"}, count=4)
    raw = {
        "run": {"dir": str(tmp_path / "run"), "seed": 3, "device": "cpu"},
        "data": {"dir": str(data), "patch_size": 64, "cutout_size": 16},
        "model": {"variant": "lite", "config": {"channels": 8, "blocks": 1}},
        "loss": {"charbonnier": 1.0, "ssim": 0.2, "gradient": 0.5},
        "optim": {"lr": 1e-3, "batch_size": 2},
        "schedule": {"max_steps": 4, "log_every": 1, "validate_every": 2, "validation_samples": 2},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_steps_change_weights_and_lower_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    trainer = Trainer(parse_config(_config(tmp_path, optim={"lr": 5e-3})))
    batch = trainer.batches.batch(0)
    before = _params(trainer.generator)
    first = trainer.train_step(batch)["loss"]
    # The output layer starts at zero (output = input), so the first step moves only it
    # and the second reaches every layer behind it.
    changed = [k for k, v in _params(trainer.generator).items() if not torch.equal(v, before[k])]
    assert sorted(changed) == ["tail.bias", "tail.weight"]
    trainer.train_step(batch)
    assert all(not torch.equal(v, before[k]) for k, v in _params(trainer.generator).items())
    for _ in range(14):
        last = trainer.train_step(batch)["loss"]
    assert last < first * 0.8


def test_resume_gives_exactly_the_next_step_of_an_uninterrupted_run(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path))
    straight = Trainer(config)
    for step in range(3):
        straight.train_step(straight.batches.batch(step))

    first = Trainer(config)
    for step in range(2):
        first.train_step(first.batches.batch(step))
    path = first.save_checkpoint()
    torch.manual_seed(12345)  # whatever happened in between must not matter
    np.random.seed(54321)
    resumed = Trainer(config)
    resumed.load_checkpoint(path)
    assert resumed.step == 2
    resumed.train_step(resumed.batches.batch(resumed.step))

    expected, got = _params(straight.generator), _params(resumed.generator)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    expected_opt = straight.optimizer.state_dict()["state"]
    got_opt = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(expected_opt[i]["exp_avg_sq"], got_opt[i]["exp_avg_sq"]) for i in expected_opt)


def test_train_runs_validates_logs_and_continues(tmp_path: Path) -> None:
    raw = _config(tmp_path)
    config_path = tmp_path / "lite.toml"
    config_path.write_text(_toml(raw))
    result = train(config_path, max_steps=2, progress=False)
    assert result.steps == 2 and result.best_step == 2
    scores = result.last_validation
    assert scores["val_psnr_input"] == pytest.approx(scores["val_psnr"] - scores["val_psnr_gain"])
    # one validation video, "c": its PSNR is the split's
    assert scores["val_psnr_c"] == pytest.approx(scores["val_psnr"])
    assert scores["val_psnr_input_c"] == pytest.approx(scores["val_psnr_input"])
    run_dir = Path(raw["run"]["dir"])
    assert (run_dir / LAST_CHECKPOINT).is_file() and (run_dir / "best.pt").is_file()
    again = train(config_path, max_steps=4, progress=False)
    assert again.steps == 4
    events = [json.loads(line) for line in (run_dir / METRICS_LOG).read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "validation"] == [2, 4]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]


def test_training_only_sees_its_split(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", {"a": "train", "b": "validation"}, count=3)
    assert set(SampleSet(data, "train").videos) == {"a"}
    assert set(SampleSet(data, "validation").videos) == {"b"}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


def test_a_split_holds_every_files_rows_in_file_order(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", {"a": "train", "b": "train", "c": "validation"}, count=3)
    samples = SampleSet(data, "train", ("hq", "stream"))
    files = [_arrays(data / name) for name in ds.DatasetManifest.read(data).files_of("train")]
    assert np.array_equal(samples.compressed, np.concatenate([f[ds.COMPRESSED] for f in files]))
    assert np.array_equal(samples.target, np.concatenate([f[ds.TARGET] for f in files]))
    for mode in ("hq", "stream"):
        assert np.array_equal(samples.references[mode], np.concatenate([f[ds.reference_key(mode)] for f in files]))
    assert samples.videos[:6] == ["a"] * 3 + ["b"] * 3


def test_a_damaged_sample_file_is_named(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", {"a": "train", "b": "train", "c": "validation"}, count=3)
    damaged = data / ds.sample_file_name("b", 42)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with pytest.raises(InputError, match="b_crf42.npz: unreadable sample file"):
        SampleSet(data, "train")


def test_vgg_losses_without_weights_stop_with_a_clear_message(tmp_path: Path) -> None:
    raw = _config(tmp_path, loss={"perceptual": 10.0, "vgg_weights": None})
    with pytest.raises(ModelError, match="vgg19-dcbb9e9d.pth"):
        Trainer(parse_config(raw))


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim.lr"):
        parse_config({"optim": {"lr": -1}})
    with pytest.raises(ConfigError, match="data.patch_size"):
        parse_config({"data": {"patch_size": 100}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_guided_trains_on_both_reference_modes_and_validates_each(tmp_path: Path) -> None:
    raw = _config(
        tmp_path,
        model={"variant": "guided", "config": {"fine": 8, "coarse": 16, "blocks": 1, "fine_blocks": 0, "key_channels": 8}},
        data={"reference_modes": ["hq", "stream"], "clean_keyframes": True},
    )
    # The first sample of video "a" sits on its own I-frame.
    path = Path(raw["data"]["dir"]) / ds.sample_file_name("a", 42)
    with np.load(path) as arrays:
        samples = {k: arrays[k] for k in arrays.files}
    samples[ds.KEY_INDEX][0] = samples[ds.FRAME_INDEX][0]
    np.savez(path, **samples)
    trainer = Trainer(parse_config(raw))
    modes = trainer.train_samples.modes
    # 8 rows: 8 stream samples, 7 hq ones (not the self-referenced), 1 clean one.
    assert (modes.count("stream"), modes.count("hq"), modes.count("clean")) == (8, 7, 1)
    before = trainer.train_step(trainer.batches.batch(0))["loss"]
    assert np.isfinite(before)
    scores = trainer.validate()
    assert {"val_psnr_mode_hq", "val_psnr_mode_stream", "val_psnr_noref_mode_hq", "val_psnr_c"} <= set(scores)


def test_shipped_configs_are_valid() -> None:
    guided = load_config(ROOT / "configs" / "guided.toml")
    assert guided.model.variant == "guided" and guided.data.reference_modes == ["hq", "stream"]
    assert guided.run.threads == 1 and not guided.loss.needs_vgg
    flow = load_config(ROOT / "configs" / "guided-flow.toml")
    assert flow.data.reference_flow == "dis-fast" and flow.optim.ema is not None
    assert (ROOT / flow.model.init).is_file() and flow.model.config == guided.model.config
    assert flow.data.dir == guided.data.dir and flow.dataset == guided.dataset
    lite = load_config(ROOT / "configs" / "lite.toml")
    assert lite.model.variant == "lite" and not lite.loss.needs_vgg
    full = load_config(ROOT / "configs" / "full.toml")
    assert (full.loss.mse, full.loss.perceptual, full.loss.style, full.loss.adversarial) == (300, 10, 1, 2)
    assert full.loss.discriminator_scale_weights == [4, 2, 1, 1]
    assert (full.optim.lr, full.optim.betas, full.optim.batch_size) == (1e-4, (0.9, 0.99), 4)


def _toml(raw: dict) -> str:
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            elif value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_exported_weights_rebuild_the_same_generator(tmp_path: Path) -> None:
    from safetensors import safe_open

    from kfgan_daemon.model.lite import LiteGenerator
    from kfgan_daemon.train.trainer import export_checkpoint

    trainer = Trainer(parse_config(_config(tmp_path)))
    for step in range(2):
        trainer.train_step(trainer.batches.batch(step))
    path = export_checkpoint(trainer.save_checkpoint(), tmp_path / "lite.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert metadata["variant"] == "lite"
    rebuilt = LiteGenerator(**json.loads(metadata["config"]))
    rebuilt.load_state_dict(tensors)
    inputs = trainer.batches.batch(0)
    trainer.generator.eval()
    with torch.inference_mode():
        expected = trainer.generator(inputs.compressed, inputs.reference, inputs.landmarks)
        assert torch.equal(rebuilt.eval()(inputs.compressed, inputs.reference, inputs.landmarks), expected)
    half = export_checkpoint(tmp_path / "run" / LAST_CHECKPOINT, tmp_path / "half.safetensors", half=True)
    assert half.stat().st_size < path.stat().st_size * 0.6
    with pytest.raises(ModelError, match="cannot read"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "x.safetensors")


class _TinyMultiScaleDiscriminator(torch.nn.Module):
    """Stands in for the model package's discriminator: four scales, one map each."""

    def __init__(self) -> None:
        super().__init__()
        self.scales = torch.nn.ModuleList(torch.nn.Conv2d(3, 1, 3, padding=1) for _ in range(4))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, conv in enumerate(self.scales):
            outputs.append(conv(torch.nn.functional.avg_pool2d(images, 2**index)))
        return outputs


def test_paper_losses_with_a_discriminator_train_and_resume_exactly(tmp_path: Path, monkeypatch) -> None:
    import kfgan_daemon.model

    from test_train_losses import _tiny_vgg_file

    monkeypatch.setattr(kfgan_daemon.model, "MultiScaleDiscriminator", _TinyMultiScaleDiscriminator, raising=False)
    vgg = _tiny_vgg_file(tmp_path / "vgg19.pth")
    raw = _config(
        tmp_path,
        loss={"charbonnier": 0.0, "ssim": 0.0, "gradient": 0.0, "mse": 300.0, "perceptual": 10.0, "style": 1.0,
              "adversarial": 2.0, "vgg_weights": str(vgg)},
        data={"patch_size": 32},
    )
    config = parse_config(raw)
    straight = Trainer(config)
    d_before = _params(straight.discriminator)
    values = straight.train_step(straight.batches.batch(0))
    assert set(values) == {"mse", "perceptual", "style", "adversarial", "discriminator", "loss"}
    assert values["loss"] == pytest.approx(sum(v for k, v in values.items() if k not in ("loss", "discriminator")))
    assert any(not torch.equal(v, d_before[k]) for k, v in _params(straight.discriminator).items())
    straight.train_step(straight.batches.batch(1))

    first = Trainer(config)
    first.train_step(first.batches.batch(0))
    path = first.save_checkpoint()
    resumed = Trainer(config)
    resumed.load_checkpoint(path)
    resumed.train_step(resumed.batches.batch(1))
    for mine, theirs in ((straight.generator, resumed.generator), (straight.discriminator, resumed.discriminator)):
        expected, got = _params(mine), _params(theirs)
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_model_init_and_config_errors(tmp_path: Path) -> None:
    from kfgan_daemon.train.trainer import export_generator

    trainer = Trainer(parse_config(_config(tmp_path)))
    trainer.train_step(trainer.batches.batch(0))
    weights = export_generator(trainer.generator, tmp_path / "start.safetensors", "lite")
    started = Trainer(parse_config(_config(tmp_path, model={"init": str(weights)})))
    assert all(torch.equal(v, trainer.generator.state_dict()[k]) for k, v in started.generator.state_dict().items())
    with pytest.raises(ConfigError, match="model.config"):
        Trainer(parse_config(_config(tmp_path, model={"config": {"width": 3}})))


def test_init_into_a_deeper_generator_keeps_what_it_computes(tmp_path: Path) -> None:
    from kfgan_daemon.train.trainer import export_generator

    trainer = Trainer(parse_config(_config(tmp_path)))
    for step in range(3):
        trainer.train_step(trainer.batches.batch(step))
    weights = export_generator(trainer.generator, tmp_path / "shallow.safetensors", "lite")
    deeper = {"variant": "lite", "config": {"channels": 8, "blocks": 3}, "init": str(weights)}
    deepened = Trainer(parse_config(_config(tmp_path, model=deeper)))
    batch = trainer.batches.batch(7)
    with torch.no_grad():
        expected = trainer.generator.eval()(batch.compressed, batch.reference, batch.landmarks)
        got = deepened.generator.eval()(batch.compressed, batch.reference, batch.landmarks)
    assert torch.equal(expected, got)
    # The added blocks learn: their output layer leaves zero at the first step.
    deepened.train_step(deepened.batches.batch(0))
    assert deepened.generator.body[2].conv2.weight.abs().sum() > 0
    wider = {"variant": "lite", "config": {"channels": 12, "blocks": 1}, "init": str(weights)}
    with pytest.raises(ModelError, match="wrong shape"):
        Trainer(parse_config(_config(tmp_path, model=wider)))


def test_weight_average_is_validated_exported_and_resumed_exactly(tmp_path: Path) -> None:
    from kfgan_daemon.model import load_generator
    from kfgan_daemon.train.trainer import export_checkpoint

    config = parse_config(_config(tmp_path, optim={"ema": 0.5}))
    straight = Trainer(config)
    history = []
    for step in range(3):
        straight.train_step(straight.batches.batch(step))
        history.append(_params(straight.generator))
    # The first update copies the weights; then average = 0.5 * average + 0.5 * weights.
    expected = {k: 0.25 * history[0][k] + 0.25 * history[1][k] + 0.5 * history[2][k] for k in history[0]}
    averaged = _params(straight.evaluated)
    assert all(torch.allclose(averaged[k], expected[k], atol=1e-6) for k in expected if k.endswith("weight"))
    assert not all(torch.equal(averaged[k], history[2][k]) for k in expected)

    first = Trainer(config)
    for step in range(2):
        first.train_step(first.batches.batch(step))
    path = first.save_checkpoint()
    resumed = Trainer(config)
    resumed.load_checkpoint(path)
    resumed.train_step(resumed.batches.batch(resumed.step))
    got = _params(resumed.evaluated)
    assert all(torch.equal(averaged[k], got[k]) for k in averaged)

    exported = load_generator(export_checkpoint(path, tmp_path / "average.safetensors"))
    assert all(torch.equal(v, first.evaluated.state_dict()[k]) for k, v in exported.state_dict().items())
    scores = resumed.validate()
    resumed._save_best(scores)
    best = torch.load(Path(config.run.dir) / "best.pt", weights_only=True)["generator"]
    assert all(torch.equal(best[k], got[k]) for k in got)


def test_refined_references_are_trained_on_and_recorded_in_the_export(tmp_path: Path) -> None:
    from kfgan_daemon.face.reference_flow import refine_reference
    from kfgan_daemon.model import read_checkpoint
    from kfgan_daemon.train.trainer import export_checkpoint

    raw = _config(tmp_path, data={"reference_flow": "dis-fast"}, export={"best": str(tmp_path / "best.safetensors")})
    trainer = Trainer(parse_config(raw))
    plain = SampleSet(Path(raw["data"]["dir"]), "train")
    compressed, reference, _, _ = trainer.train_samples.images(0)
    assert np.array_equal(reference, refine_reference(compressed, plain.images(0)[1]))
    assert trainer.validation_samples.reference_flow == "dis-fast"
    trainer.train_step(trainer.batches.batch(0))
    last = trainer.save_checkpoint()
    trainer._save_best(trainer.validate())
    assert read_checkpoint(tmp_path / "best.safetensors").reference_flow == "dis-fast"
    exported = export_checkpoint(last, tmp_path / "last.safetensors")
    assert read_checkpoint(exported).reference_flow == "dis-fast"


def test_loader_workers_give_the_same_training(tmp_path: Path) -> None:
    raw = _config(tmp_path)
    inline = Trainer(parse_config(raw))
    inline.run(max_steps=3, progress=False)
    raw["run"] = {**raw["run"], "dir": str(tmp_path / "workers"), "loader_workers": 2}
    workers = Trainer(parse_config(raw))
    workers.run(max_steps=3, progress=False)
    assert workers.step == inline.step == 3
    expected, got = _params(inline.generator), _params(workers.generator)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_batch_stream_with_workers_is_the_steps_batches_in_order(tmp_path: Path) -> None:
    from kfgan_daemon.train.samples import batch_stream

    trainer = Trainer(parse_config(_config(tmp_path)))
    made = list(batch_stream(trainer.batches, 2, 6, workers=2))
    assert len(made) == 4
    for step, batch in zip(range(2, 6), made):
        expected = trainer.batches.batch(step)
        assert torch.equal(batch.compressed, expected.compressed) and torch.equal(batch.target, expected.target)


def test_the_face_settings_of_the_dataset_are_recorded_in_the_export(tmp_path: Path) -> None:
    from kfgan_daemon.model import read_checkpoint
    from kfgan_daemon.restore.face_pipeline import face_record
    from kfgan_daemon.restore.settings import RestoreSettings
    from kfgan_daemon.train.trainer import export_checkpoint

    raw = _config(tmp_path, export={"best": str(tmp_path / "best.safetensors")})
    data = Path(raw["data"]["dir"])
    manifest = ds.DatasetManifest.read(data)
    cut = face_record(RestoreSettings(alignment="published"))
    manifest.options["faces"] = cut
    manifest.write(data)
    trainer = Trainer(parse_config(raw))
    trainer.train_step(trainer.batches.batch(0))
    last = trainer.save_checkpoint()
    trainer._save_best(trainer.validate())
    assert read_checkpoint(tmp_path / "best.safetensors").face_settings == cut
    assert read_checkpoint(export_checkpoint(last, tmp_path / "last.safetensors")).face_settings == cut
