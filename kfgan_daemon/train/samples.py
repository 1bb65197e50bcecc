"""Built samples in memory, the training order, and augmentation.

Everything random here is a pure function of (seed, step), not of a global generator
or of worker processes: resuming at step k replays exactly the batches an
uninterrupted run would have drawn, with nothing but k in the checkpoint.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kfgan_daemon.errors import ConfigError, InputError
from kfgan_daemon.face.reference_flow import refined_references
from kfgan_daemon.train import dataset as ds

log = logging.getLogger(__name__)

CROP = 256


@dataclass
class Augmentation:
    """Geometric transforms are applied identically to every image of a sample.

    ``shift``: the largest translation in pixels (reflected border), used when the
    patch is the whole crop (a smaller patch at a random place is already a shift).
    ``rotate``: a random multiple of 90 degrees. ``cutout_probability`` and
    ``cutout_size``: a square of the *reference* is blanked, so that the model learns to
    fall back on the degraded crop where the warped keyframe is missing or wrong
    (blanking input and target alike would teach nothing but copying zeros).
    """

    shift: int = 16
    rotate: bool = True
    cutout_probability: float = 0.3
    cutout_size: int = 64


@dataclass
class Batch:
    """Generator inputs and target, N x 3 x H x W RGB float in [0, 1]."""

    compressed: torch.Tensor
    reference: torch.Tensor
    landmarks: torch.Tensor
    target: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.compressed, self.reference, self.landmarks, self.target)))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that the copy to a GPU can overlap the step (DataLoader calls this)."""
        return Batch(*(t.pin_memory() for t in (self.compressed, self.reference, self.landmarks, self.target)))

    def __len__(self) -> int:
        return int(self.compressed.shape[0])


class SampleSet:
    """All samples of one split of a built dataset, held in memory as uint8 RGB.

    Each stored row yields one sample per reference mode in ``reference_modes``;
    ``exclude_self_reference`` drops hq samples on an I-frame (their reference is the
    target); ``clean_keyframes`` adds, for each row on an I-frame, a sample whose input
    is the original crop with the hq reference: a frame that is already good, which the
    model must leave as it is. ``reference_flow`` refines each sample's warped keyframe
    against its input as the restorer will (:mod:`kfgan_daemon.face.reference_flow`).
    """

    def __init__(
        self,
        data_dir: Path,
        split: str,
        reference_modes: tuple[str, ...] | list[str] = ("hq",),
        exclude_self_reference: bool = True,
        clean_keyframes: bool = False,
        reference_flow: str | None = None,
    ) -> None:
        manifest = ds.DatasetManifest.read(Path(data_dir))
        self.reference_flow = reference_flow
        # How the faces were cut; the trained model records it (None: an older dataset).
        self.face_settings = manifest.face_settings
        names = manifest.files_of(split)
        if not names:
            raise InputError(f"{data_dir}: the dataset has no {split!r} files (manifest lists {sorted(manifest.files)})")
        self.reference_modes = tuple(reference_modes)
        # Clean samples take the hq reference, whether or not hq samples are drawn.
        loaded_modes = sorted(set(self.reference_modes) | ({"hq"} if clean_keyframes else set()))
        keys = (ds.COMPRESSED, ds.TARGET, ds.CROP_LANDMARKS, *(ds.reference_key(m) for m in loaded_modes))
        paths = [Path(data_dir) / name for name in names]
        # Rows are counted first and copied into arrays of their final size: concatenating
        # per-file arrays would need twice the split's memory at its peak (GBs of crops).
        on_keyframe: list[np.ndarray] = []
        for path in paths:
            with ds.open_sample_file(path) as loaded:
                on_keyframe.append(loaded[ds.KEY_INDEX] == loaded[ds.FRAME_INDEX])
        row_videos = [manifest.files[name]["video"] for name, rows in zip(names, on_keyframe) for _ in rows]
        total = sum(len(rows) for rows in on_keyframe)
        with ds.open_sample_file(paths[0]) as loaded:
            columns = {key: np.empty((total, *loaded[key].shape[1:]), loaded[key].dtype) for key in keys}
        start = 0
        for path, rows in zip(paths, on_keyframe):
            with ds.open_sample_file(path) as loaded:
                for key, column in columns.items():
                    column[start : start + len(rows)] = loaded[key]
            start += len(rows)
        self.compressed = columns[ds.COMPRESSED]
        self.target = columns[ds.TARGET]
        self.crop_landmarks = columns[ds.CROP_LANDMARKS]
        self.references = {m: columns[ds.reference_key(m)] for m in loaded_modes}
        # The arrays' shared-memory tensors once share_memory() made them, by column name.
        self._shared: dict[str, torch.Tensor] = {}
        keyframe_rows = np.concatenate(on_keyframe)
        # (row, reference mode, clean) of every sample, in a fixed order.
        self.index: list[tuple[int, str, bool]] = []
        for mode in self.reference_modes:
            for row in range(len(keyframe_rows)):
                if not (exclude_self_reference and mode == "hq" and keyframe_rows[row]):
                    self.index.append((row, mode, False))
        if clean_keyframes:
            self.index.extend((int(row), "hq", True) for row in np.flatnonzero(keyframe_rows))
        self.videos = [row_videos[row] for row, _, _ in self.index]
        self.modes = [mode if not clean else "clean" for _, mode, clean in self.index]
        if len(self) == 0:
            raise InputError(f"{data_dir}: the {split!r} split holds no usable samples")
        log.info("loaded %d %s samples (%d rows) from %d files", len(self), split, len(keyframe_rows), len(names))

    def __len__(self) -> int:
        return len(self.index)

    def share_memory(self) -> None:
        """Move the arrays to shared memory (once, a column at a time), so that loader workers
        started afresh receive them as handles, not as gigabytes of pickled bytes."""
        for name, array in self._columns().items():
            if name in self._shared:
                continue
            shared = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype).share_memory_()
            shared.numpy()[...] = array
            self._shared[name] = shared
            self._set_column(name, shared.numpy())

    def _columns(self) -> dict[str, np.ndarray]:
        columns = {"compressed": self.compressed, "target": self.target, "crop_landmarks": self.crop_landmarks}
        columns.update({f"reference_{mode}": array for mode, array in self.references.items()})
        return columns

    def _set_column(self, name: str, array: np.ndarray) -> None:
        if name.startswith("reference_"):
            self.references[name.removeprefix("reference_")] = array
        else:
            setattr(self, name, array)

    def __getstate__(self) -> dict:
        # Shared columns travel as their tensors (torch pickles those as handles), not as arrays.
        state = {key: value for key, value in self.__dict__.items() if key not in self._shared}
        state["references"] = {m: a for m, a in self.references.items() if f"reference_{m}" not in self._shared}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name, tensor in self._shared.items():
            self._set_column(name, tensor.numpy())

    def images(self, index: int) -> list[np.ndarray]:
        """compressed, reference, landmark image, target: 256x256x3 uint8 RGB."""
        from kfgan_daemon.face import landmark_image

        row, mode, clean = self.index[index]
        target = self.target[row]
        compressed = target if clean else self.compressed[row]
        (reference,) = refined_references([compressed], [self.references[mode][row]], self.reference_flow)
        return [compressed, reference, landmark_image(self.crop_landmarks[row]), target]


def epoch_permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def batch_indices(count: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Sample indices of training step ``step``: consecutive slices of one permutation per epoch."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        indices.append(int(epoch_permutation(count, seed, epoch)[offset]))
    return indices


def augment(images: list[np.ndarray], patch: int, augmentation: Augmentation, rng: np.random.Generator) -> list[np.ndarray]:
    """One random geometric transform for all of ``images`` (compressed, reference, landmarks, target)."""
    size = images[0].shape[0]
    if patch < size:
        y, x = (int(v) for v in rng.integers(0, size - patch + 1, size=2))
        images = [im[y : y + patch, x : x + patch] for im in images]
    elif augmentation.shift > 0:
        s = augmentation.shift
        dy, dx = (int(v) for v in rng.integers(-s, s + 1, size=2))
        images = [_shift(im, dy, dx) for im in images]
    if augmentation.rotate:
        turns = int(rng.integers(0, 4))
        images = [np.rot90(im, turns) for im in images]
    if augmentation.cutout_size > 0 and rng.random() < augmentation.cutout_probability:
        side = min(augmentation.cutout_size, images[1].shape[0])
        y, x = (int(v) for v in rng.integers(0, images[1].shape[0] - side + 1, size=2))
        reference = images[1].copy()
        reference[y : y + side, x : x + side] = 0
        images[1] = reference
    return images


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    s = max(abs(dy), abs(dx))
    if s == 0:
        return image
    padded = np.pad(image, ((s, s), (s, s), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    return padded[s - dy : s - dy + h, s - dx : s - dx + w]


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """Stack RGB uint8 HxWx3 images into an N x 3 x H x W float tensor in [0, 1]."""
    stacked = np.stack([np.ascontiguousarray(im) for im in images])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


class TrainingBatches:
    """The deterministic stream of augmented training batches."""

    def __init__(self, samples: SampleSet, batch_size: int, patch: int, augmentation: Augmentation, seed: int) -> None:
        if not 16 <= patch <= CROP or patch % 16:
            raise ConfigError(f"data.patch_size must be a multiple of 16 in [16, {CROP}], got {patch}")
        self.samples = samples
        self.batch_size = batch_size
        self.patch = patch
        self.augmentation = augmentation
        self.seed = seed

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, 1, step])
        columns: list[list[np.ndarray]] = [[], [], [], []]
        for index in batch_indices(len(self.samples), self.batch_size, step, self.seed):
            for column, image in zip(columns, augment(self.samples.images(index), self.patch, self.augmentation, rng)):
                column.append(image)
        return Batch(*(to_tensor(column) for column in columns))


class _Steps(torch.utils.data.Dataset):
    """Training steps ``first`` .. ``last - 1`` as a dataset whose items are their batches."""

    def __init__(self, batches: TrainingBatches, first: int, last: int) -> None:
        self.batches = batches
        self.first = first
        self.last = last

    def __len__(self) -> int:
        return max(self.last - self.first, 0)

    def __getitem__(self, index: int) -> Batch:
        return self.batches.batch(self.first + index)


def _loader_worker(worker: int) -> None:
    import signal

    import cv2

    # Every worker makes whole batches; threads inside them would only fight over the cores.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    # A Ctrl-C or SIGTERM sent to the whole process group is the trainer's to act on: it ends
    # the run after the step and then stops the workers, which would otherwise die under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_stream(
    batches: TrainingBatches, first: int, last: int, workers: int = 0, pin_memory: bool = False
) -> Iterator[Batch]:
    """The batches of steps ``first`` .. ``last - 1`` in order. With ``workers`` they are made
    ahead in that many processes (a GPU consumes them faster than one core makes them);
    each is still the pure function of its step, so the stream is the same either way."""
    if workers == 0:
        return (batches.batch(step) for step in range(first, last))
    batches.samples.share_memory()
    loader = torch.utils.data.DataLoader(
        _Steps(batches, first, last),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4,
        worker_init_fn=_loader_worker,
        # Spawned, not forked: a forked child hangs in torch's OpenMP pool once the trainer has used it.
        multiprocessing_context="spawn",
    )
    return iter(loader)


def validation_batches(samples: SampleSet, batch_size: int, limit: int | None = None) -> Iterator[tuple[list[int], Batch]]:
    """(sample indices, batch) of whole 256x256 crops in a fixed order, no augmentation."""
    count = len(samples) if limit is None else min(limit, len(samples))
    # An even spread over the split when limited, so that every validation video counts.
    order = np.linspace(0, len(samples) - 1, count).round().astype(int) if count < len(samples) else np.arange(count)
    for start in range(0, count, batch_size):
        indices = [int(i) for i in order[start : start + batch_size]]
        columns: list[list[np.ndarray]] = [[], [], [], []]
        for index in indices:
            for column, image in zip(columns, samples.images(index)):
                column.append(image)
        yield indices, Batch(*(to_tensor(column) for column in columns))
