"""Choosing which neurons to prune from their masks, and reading/writing mask files.

Neurons are ordered by mask value, lowest first (ties keep graph order). A :class:`PruneSpec` says
how many of that order to prune: every neuron with mask <= threshold (the reference's default,
t = 0.2), a count, or a fraction of all neurons.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from .errors import DataError, SettingsError
from .neurons import NeuronLayer

PRUNE_MODES = ("auto", "threshold", "count", "fraction")
MASKS_FORMAT = "anp-onnx-masks"


@dataclass(frozen=True)
class PruneSpec:
    """How much to prune: ``mode`` is auto, threshold, count or fraction; ``value`` its parameter.

    ``auto`` prunes, in mask order, as many neurons as keeps clean accuracy on held-out clean data
    within ``value`` (the accuracy budget, default 0.02 = 2 points) of the unpruned model's; it needs
    a pruning curve (see :mod:`anp_onnx.curve`). ``threshold`` 0.2 is the reference's choice.
    """

    mode: str = "auto"
    value: float = 0.02

    def __post_init__(self) -> None:
        if self.mode not in PRUNE_MODES:
            raise SettingsError(f"pruning mode must be one of {', '.join(PRUNE_MODES)}, not {self.mode!r}")
        if self.mode == "auto" and not 0.0 <= self.value <= 1.0:
            raise SettingsError("the accuracy budget of automatic pruning must be in [0, 1]")
        if self.mode == "threshold" and not 0.0 <= self.value <= 1.0:
            raise SettingsError("pruning threshold must be in [0, 1]")
        if self.mode == "count" and (self.value < 0 or self.value != int(self.value)):
            raise SettingsError("pruning count must be a whole number >= 0")
        if self.mode == "fraction" and not 0.0 <= self.value <= 1.0:
            raise SettingsError("pruning fraction must be in [0, 1]")

    @classmethod
    def auto(cls, max_drop: float = 0.02) -> "PruneSpec":
        return cls("auto", float(max_drop))

    @classmethod
    def threshold(cls, t: float) -> "PruneSpec":
        return cls("threshold", float(t))

    @classmethod
    def count(cls, k: int) -> "PruneSpec":
        return cls("count", k)

    @classmethod
    def fraction(cls, f: float) -> "PruneSpec":
        return cls("fraction", float(f))

    def describe(self) -> str:
        if self.mode == "auto":
            return f"automatic choice from clean data; accuracy budget {100 * self.value:g} points without a backdoor signal"
        if self.mode == "threshold":
            return f"mask <= {self.value:g}"
        if self.mode == "count":
            return f"{int(self.value)} lowest masks"
        return f"lowest {self.value:.1%} of neurons"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "value": self.value}


@dataclass(frozen=True)
class RankedNeuron:
    layer: str
    index: int
    mask: float


@dataclass(frozen=True)
class PrunePlan:
    """Neurons to prune, as layer name -> sorted channel indices."""

    pruned: Mapping[str, np.ndarray]
    spec: PruneSpec
    total: int

    @property
    def count(self) -> int:
        return int(sum(len(v) for v in self.pruned.values()))

    def per_layer(self) -> dict[str, int]:
        return {name: int(len(idx)) for name, idx in self.pruned.items()}

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(), "count": self.count, "total": self.total,
            "neurons": {name: [int(i) for i in idx] for name, idx in self.pruned.items() if len(idx)},
        }


def rank_neurons(masks: Mapping[str, np.ndarray],
                 tiebreak: Optional[Mapping[str, np.ndarray]] = None) -> list[RankedNeuron]:
    """All neurons, lowest mask first.

    Among equal masks the lower ``tiebreak`` value goes first (anp-onnx passes each mask's mean over
    the optimisation: the mask that fell earlier ranks lower); remaining ties keep layer order, then
    channel order.
    """
    names = list(masks)
    final = np.concatenate([np.asarray(masks[n], dtype=np.float64).ravel() for n in names]) if names else np.zeros(0)
    if tiebreak is not None and all(n in tiebreak for n in names):
        second = np.concatenate([np.asarray(tiebreak[n], dtype=np.float64).ravel() for n in names])
    else:
        second = np.zeros_like(final)
    order = np.lexsort((np.arange(final.size), second, final))
    flat = [(n, i) for n in names for i in range(len(masks[n]))]
    return [RankedNeuron(flat[j][0], flat[j][1], float(final[j])) for j in order]


def plan_pruning(masks: Mapping[str, np.ndarray], spec: PruneSpec,
                 tiebreak: Optional[Mapping[str, np.ndarray]] = None) -> PrunePlan:
    """The neurons that ``spec`` prunes given ``masks`` (ranked with ``tiebreak``, see rank_neurons)."""
    if spec.mode == "auto":
        raise SettingsError("automatic pruning needs held-out clean data: use a pruning curve "
                            "(Repairer.pruning_curve) or give a threshold, count or fraction")
    ranked = rank_neurons(masks, tiebreak)
    total = len(ranked)
    if spec.mode == "threshold":
        # masks are float32: compare in float32 so that a mask of exactly 0.2 is pruned at t = 0.2
        t = np.float32(spec.value)
        chosen = [n for n in ranked if np.float32(n.mask) <= t]
    else:
        k = int(spec.value) if spec.mode == "count" else int(math.floor(spec.value * total + 1e-9))
        if k > total:
            raise SettingsError(f"cannot prune {k} neurons: the model has {total}")
        chosen = ranked[:k]
    return plan_from_neurons(masks, chosen, spec)


def plan_from_neurons(masks: Mapping[str, np.ndarray], chosen: Iterable[RankedNeuron], spec: PruneSpec) -> PrunePlan:
    pruned: dict[str, list[int]] = {name: [] for name in masks}
    for n in chosen:
        pruned[n.layer].append(n.index)
    total = int(sum(len(v) for v in masks.values()))
    return PrunePlan({k: np.array(sorted(v), dtype=np.int64) for k, v in pruned.items()}, spec, total)


def file_sha256(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_masks_json(path: os.PathLike | str, masks: Mapping[str, np.ndarray], layers: Sequence[NeuronLayer],
                    extra: Optional[Mapping[str, Any]] = None,
                    mean_masks: Optional[Mapping[str, np.ndarray]] = None,
                    centres: Optional[Mapping[str, tuple[np.ndarray, np.ndarray]]] = None) -> None:
    """Write masks with their layers' ONNX mapping (and ``extra`` facts: model hash, settings).

    ``mean_masks`` (each mask's mean over the optimisation) are stored too: they break ties; so are
    the renormalised layers' ``centres`` (clean mean and spread per neuron): folding needs them.
    """
    by_name = {layer.name: layer for layer in layers}

    def entry(name: str, values: np.ndarray) -> dict:
        out = {**by_name[name].to_dict(), "mask": [round(float(v), 6) for v in values]}
        if mean_masks is not None and name in mean_masks:
            out["mean_mask"] = [round(float(v), 6) for v in mean_masks[name]]
        if centres and name in centres:
            out["centre"] = [float(v) for v in np.asarray(centres[name][0], dtype=np.float32)]
            out["spread"] = [float(v) for v in np.asarray(centres[name][1], dtype=np.float32)]
        return out

    doc = {
        "format": MASKS_FORMAT, "version": 1, **(dict(extra) if extra else {}),
        "layers": [entry(name, values) for name, values in masks.items()],
    }
    _write_text(path, json.dumps(doc, indent=1))


def save_mask_values_txt(path: os.PathLike | str, masks: Mapping[str, np.ndarray]) -> None:
    """The reference code's mask_values.txt (tab separated, 4 decimals, one row per neuron)."""
    lines = ["No \t Layer Name \t Neuron Idx \t Mask Score \n"]
    row = 0
    for name, values in masks.items():
        for i, v in enumerate(values):
            lines.append(f"{row} \t {name} \t {i} \t {float(v):.4f} \n")
            row += 1
    _write_text(path, "".join(lines))


def load_masks(path: os.PathLike | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Masks from a masks JSON written by anp-onnx or a reference mask_values.txt; and the JSON's facts.

    The facts include ``mean_masks`` (the tie-breakers) and ``centres`` (renormalised layers' clean
    mean and spread) when the file has them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such masks file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
            masks = {layer["name"]: np.asarray(layer["mask"], dtype=np.float32) for layer in doc["layers"]}
            means = {layer["name"]: np.asarray(layer["mean_mask"], dtype=np.float32)
                     for layer in doc["layers"] if "mean_mask" in layer}
            centres = {layer["name"]: (np.asarray(layer["centre"], dtype=np.float32),
                                       np.asarray(layer["spread"], dtype=np.float32))
                       for layer in doc["layers"] if "centre" in layer}
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path} is not an anp-onnx masks file ({exc})") from exc
        facts = {k: v for k, v in doc.items() if k != "layers"}
        if means:
            facts["mean_masks"] = means
        if centres:
            facts["centres"] = centres
        return masks, facts
    return _load_txt(path, text), {}


def _load_txt(path: Path, text: str) -> dict[str, np.ndarray]:
    rows: dict[str, dict[int, float]] = {}
    for n, line in enumerate(text.splitlines()[1:], start=2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("\t")]
        try:
            _, name, idx, value = parts[:4]
            rows.setdefault(name, {})[int(idx)] = float(value)
        except ValueError:
            raise DataError(f"{path}:{n}: expected 'No, Layer Name, Neuron Idx, Mask Score' columns") from None
    if not rows:
        raise DataError(f"{path}: no mask values found")
    out = {}
    for name, values in rows.items():
        if sorted(values) != list(range(len(values))):
            raise DataError(f"{path}: layer {name} has missing neuron indices")
        out[name] = np.array([values[i] for i in range(len(values))], dtype=np.float32)
    return out


def match_masks(masks: Mapping[str, np.ndarray], layers: Sequence[NeuronLayer]) -> dict[str, np.ndarray]:
    """Check saved masks fit the model's layers (names and sizes); return them in layer order."""
    by_name = {layer.name: layer for layer in layers}
    unknown = [name for name in masks if name not in by_name]
    if unknown:
        raise DataError(f"the masks name layers this model does not have: {', '.join(unknown[:5])}")
    out = {}
    for layer in layers:
        if layer.name not in masks:
            continue
        values = np.asarray(masks[layer.name], dtype=np.float32)
        if values.shape != (layer.size,):
            raise DataError(f"masks for {layer.name} have {values.size} values, the layer has {layer.size} neurons")
        out[layer.name] = values
    if not out:
        raise DataError("the masks match no layer of this model")
    return out


def _write_text(path: os.PathLike | str, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
