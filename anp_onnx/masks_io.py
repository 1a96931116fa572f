"""Mask files: the masks JSON (with each layer's ONNX mapping, tie-breakers and renormalisation
statistics) and the reference code's mask_values.txt.

A masks file lets ``anp-onnx prune`` (and the desktop app's "load masks") write the same model
again without re-optimising.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

from .errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from .neurons import NeuronLayer

MASKS_FORMAT = "anp-onnx-masks"


def default_masks_path(out: os.PathLike | str) -> Path:
    """The masks JSON written beside a repaired model ``out``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".onnx") + ".masks.json")


def mask_values_path(masks_json: os.PathLike | str) -> Path:
    """The reference-format mask_values.txt written beside a masks JSON."""
    p = Path(masks_json)
    return p.with_name(p.name.removesuffix(".json").removesuffix(".masks") + ".mask_values.txt")


def file_sha256(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_masks_json(path: os.PathLike | str, masks: Mapping[str, np.ndarray], layers: Sequence["NeuronLayer"],
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
    _write_text(path, json.dumps(doc, indent=1, allow_nan=False))


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
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the masks file ({exc.strerror or exc})") from None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text, parse_constant=_no_constant)
            if not isinstance(doc, dict) or not isinstance(doc["layers"], list):
                raise TypeError("no list of layers")
            masks = {_name(layer): _values(layer, "mask") for layer in doc["layers"]}
            means = {layer["name"]: _values(layer, "mean_mask", len(masks[layer["name"]]))
                     for layer in doc["layers"] if "mean_mask" in layer}
            centres = {layer["name"]: (_values(layer, "centre", len(masks[layer["name"]])),
                                       _values(layer, "spread", len(masks[layer["name"]])))
                       for layer in doc["layers"] if "centre" in layer}
        except RecursionError:
            raise DataError(f"{path} is not an anp-onnx masks file (nested too deeply)") from None
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise DataError(f"{path} is not an anp-onnx masks file ({exc})") from exc
        # the facts read from the layers replace the document's own keys of those names
        facts = {k: v for k, v in doc.items() if k not in ("layers", "mean_masks", "centres")}
        if means:
            facts["mean_masks"] = means
        if centres:
            facts["centres"] = centres
        return masks, facts
    return _load_txt(path, text), {}


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a masks file may hold")


def _name(layer: Any) -> str:
    if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
        raise TypeError("a layer without a name")
    return layer["name"]


def _values(layer: dict, key: str, size: Optional[int] = None) -> np.ndarray:
    """``layer[key]``: a list of finite numbers (of ``size`` values when given)."""
    if not isinstance(layer[key], list):
        raise TypeError(f"{key} of layer {layer['name']} is not a list of numbers")
    values = np.asarray(layer[key], dtype=np.float32)
    if values.ndim != 1 or (size is not None and values.size != size):
        raise ValueError(f"{key} of layer {layer['name']} has {values.size} values, its mask "
                         f"{size if size is not None else 'a flat list'}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{key} of layer {layer['name']} holds values that are not finite")
    return values


def _load_txt(path: Path, text: str) -> dict[str, np.ndarray]:
    rows: dict[str, dict[int, float]] = {}
    for n, line in enumerate(text.splitlines()[1:], start=2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("\t")]
        try:
            _, name, idx, value = parts[:4]
            rows.setdefault(name, {})[int(idx)] = float(value)
            if not np.isfinite(rows[name][int(idx)]):
                raise ValueError
        except ValueError:
            raise DataError(f"{path}:{n}: expected 'No, Layer Name, Neuron Idx, Mask Score' columns, "
                            "the score a finite number") from None
    if not rows:
        raise DataError(f"{path}: no mask values found")
    out = {}
    for name, values in rows.items():
        if sorted(values) != list(range(len(values))):
            raise DataError(f"{path}: layer {name} has missing neuron indices")
        out[name] = np.array([values[i] for i in range(len(values))], dtype=np.float32)
    return out



def _write_text(path: os.PathLike | str, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
