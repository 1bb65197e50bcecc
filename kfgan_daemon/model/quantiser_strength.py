"""How much of the generator's correction a frame gets, by how coarsely it was quantised.

One generator restores calls from CRF 32 to CRF 42 and beyond, and the hq sender's
I-frames at QP 20-30. Trained on all of them at once, it corrects a finely quantised
frame as hard as a coarse one: at full strength it made the hq sender's CRF-32 I-frames
of two validation persons 0.19 dB worse than they arrived. On the validation persons the
least-squares gain of the shipped model's correction is 0.67 up to QP 33, rising to 1.0
at QP 37 and 1.24 from QP 45 (models/kfgan-guided.md).

The model file therefore carries that gain as a function of the quantiser (tensors
``quantiser_strength.*``), fitted on the validation persons by ``kfgan-daemon
fit-strength``; the generator scales each crop's correction by the gain at its frame's
mean block quantiser, as the decoder reported it
(:attr:`kfgan_daemon.media.frame.DecodedFrame.quantiser`). A frame whose decoder
reports none, and a model without the tensors, keep the full correction.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kfgan_daemon.errors import ModelError

TENSOR_PREFIX = "quantiser_strength."
METADATA_KEY = "quantiser_strength"
_NAMES = ("quantisers", "gains")


@dataclass(frozen=True, slots=True)
class QuantiserStrength:
    """Gains at increasing quantisers, linearly interpolated between them and held beyond them."""

    quantisers: np.ndarray
    gains: np.ndarray

    def __post_init__(self) -> None:
        q, g = np.asarray(self.quantisers, np.float64), np.asarray(self.gains, np.float64)
        if q.ndim != 1 or q.shape != g.shape or q.size == 0 or np.any(np.diff(q) <= 0) or not np.all(np.isfinite(g)):
            raise ModelError(
                "a quantiser strength needs as many finite gains as increasing quantisers, "
                f"got {q.tolist()} / {g.tolist()}"
            )

    def at(self, quantiser: float | None) -> float:
        """The gain for a frame quantised at ``quantiser`` (1 when it is unknown)."""
        if quantiser is None or not math.isfinite(quantiser):
            return 1.0
        return float(np.interp(quantiser, self.quantisers, self.gains))

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {
            TENSOR_PREFIX + "quantisers": np.asarray(self.quantisers, np.float32),
            TENSOR_PREFIX + "gains": np.asarray(self.gains, np.float32),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], origin: str = "model file") -> "QuantiserStrength | None":
        """The strength stored under :data:`TENSOR_PREFIX` (None when the file has none)."""
        present = {name for name in tensors if name.startswith(TENSOR_PREFIX)}
        if not present:
            return None
        if present != {TENSOR_PREFIX + name for name in _NAMES}:
            raise ModelError(
                f"{origin}: its quantiser strength has {sorted(present)}, not {[TENSOR_PREFIX + n for n in _NAMES]}; "
                "refit it with `kfgan-daemon fit-strength`"
            )
        try:
            return cls(*(np.asarray(tensors[TENSOR_PREFIX + name], np.float64) for name in _NAMES))
        except ModelError as exc:
            raise ModelError(f"{origin}: {exc}") from exc


def scale_corrections(
    restored: torch.Tensor,
    compressed: torch.Tensor,
    quantisers: Sequence[float | None],
    strength: QuantiserStrength | None,
) -> torch.Tensor:
    """``restored`` (N x 3 x H x W) with each crop's correction scaled by its frame's gain."""
    if strength is None:
        return restored
    gains = [strength.at(q) for q in quantisers]
    if all(g == 1.0 for g in gains):
        return restored
    scale = torch.tensor(gains, dtype=restored.dtype, device=restored.device).view(-1, 1, 1, 1)
    return compressed + scale * (restored - compressed)


@dataclass(slots=True)
class StrengthFit:
    """Least-squares gain per quantiser bin, gathered one crop at a time.

    For a crop with correction ``r`` (restored minus compressed) and error ``e`` (target
    minus compressed), the gain ``a`` that minimises ``|e - a r|^2`` over a bin is
    ``sum(r.e) / sum(r.r)``. A bin with few crops is pulled towards 1 (the generator as
    trained) by ``prior_crops`` crops' worth of correction energy. The gains are then
    made non-decreasing in the quantiser, the least-squares way (adjacent bins that
    disagree are pooled): a coarser frame never needs less correction than a finer one,
    and a thin bin borrows from its neighbours instead of jumping.
    """

    bin_width: float = 2.0
    prior_crops: float = 4.0
    _sums: dict[int, list[float]] = field(default_factory=dict)

    def add(self, quantiser: float, correction: np.ndarray, error: np.ndarray) -> None:
        r = np.asarray(correction, np.float64).ravel()
        e = np.asarray(error, np.float64).ravel()
        entry = self._sums.setdefault(int(math.floor(quantiser / self.bin_width)), [0.0, 0.0, 0.0, 0.0])
        entry[0] += float(r @ e)
        entry[1] += float(r @ r)
        entry[2] += quantiser
        entry[3] += 1

    @property
    def crops(self) -> int:
        return int(sum(entry[3] for entry in self._sums.values()))

    def result(self) -> tuple[QuantiserStrength, list[int]]:
        """The fitted strength (a gain at each bin's mean quantiser) and each bin's number of crops."""
        if not self._sums:
            raise ModelError("no crops with a known quantiser to fit a quantiser strength on")
        energy = sum(entry[1] for entry in self._sums.values())
        if energy == 0.0:
            raise ModelError("the generator corrected none of the crops: there is no correction to scale")
        prior = self.prior_crops * energy / self.crops
        bins = [self._sums[key] for key in sorted(self._sums)]
        gains = _non_decreasing([entry[0] + prior for entry in bins], [entry[1] + prior for entry in bins])
        quantisers = [entry[2] / entry[3] for entry in bins]
        return QuantiserStrength(np.array(quantisers), np.array(gains)), [int(entry[3]) for entry in bins]


def _non_decreasing(numerators: list[float], denominators: list[float]) -> list[float]:
    """The non-decreasing ratios closest, in the least-squares sense, to numerators / denominators
    (pool adjacent violators: a pooled run's ratio is its summed numerator over its summed denominator)."""
    runs: list[list[float]] = []  # [numerator, denominator, bins]
    for numerator, denominator in zip(numerators, denominators):
        runs.append([numerator, denominator, 1])
        while len(runs) > 1 and runs[-2][0] / runs[-2][1] > runs[-1][0] / runs[-1][1]:
            last = runs.pop()
            runs[-1] = [runs[-1][0] + last[0], runs[-1][1] + last[1], runs[-1][2] + last[2]]
    return [run[0] / run[1] for run in runs for _ in range(int(run[2]))]
