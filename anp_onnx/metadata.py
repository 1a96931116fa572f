"""The ``anp_onnx.*`` entries of a model's ``metadata_props``: what a repair recorded in the file.

No torch here: reading what a repaired file says (its preprocessing, what was pruned) needs only onnx.
"""

from __future__ import annotations

import json
from typing import Mapping, Optional

import onnx

from .preprocessing import Preprocessing

METADATA_PREFIX = "anp_onnx."


def set_metadata(model: onnx.ModelProto, entries: Mapping[str, object]) -> None:
    """Replace ``anp_onnx.<key>`` metadata entries (JSON values); other entries are kept."""
    keep = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key = METADATA_PREFIX + key
        prop.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def read_metadata(model: onnx.ModelProto) -> dict[str, object]:
    """The ``anp_onnx.*`` metadata of a model, JSON-decoded where possible."""
    out: dict[str, object] = {}
    for p in model.metadata_props:
        if p.key.startswith(METADATA_PREFIX):
            try:
                out[p.key[len(METADATA_PREFIX):]] = json.loads(p.value)
            except ValueError:
                out[p.key[len(METADATA_PREFIX):]] = p.value
    return out


def preprocessing_from_metadata(model: onnx.ModelProto) -> Optional[Preprocessing]:
    """The preprocessing an earlier anp-onnx run recorded in ``model``, if any."""
    entry = read_metadata(model).get("preprocessing")
    if isinstance(entry, dict):
        try:
            return Preprocessing.from_dict(entry)
        except Exception:  # noqa: BLE001 - metadata written by another version: ignore it
            return None
    return None
