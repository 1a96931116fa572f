"""What the app remembers between runs (QSettings) and what one session has produced so far."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from PySide6.QtCore import QSettings

import anp_onnx
from anp_onnx import ANPConfig

ORGANIZATION = "anp-onnx"
APPLICATION = "anp-onnx-gui"
MAX_RECENT = 8


class Settings:
    """Typed access to the app's QSettings: recent models, last folders, ANP settings, presets."""

    def __init__(self, qsettings: Optional[QSettings] = None) -> None:
        self.q = qsettings if qsettings is not None else QSettings(ORGANIZATION, APPLICATION)

    # -- plain values -------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        value = self.q.value(key, default)
        return default if value is None else value

    def set(self, key: str, value: Any) -> None:
        self.q.setValue(key, value)

    def sync(self) -> None:
        self.q.sync()

    # -- recent model files ---------------------------------------------------------------------
    def recent_files(self) -> list[str]:
        value = self.q.value("recent/files", [])
        if isinstance(value, str):  # INI files give a single entry back as a string
            value = [value] if value else []
        return [str(v) for v in (value or []) if v]

    def add_recent(self, path: str | Path) -> None:
        path = str(Path(path).resolve())
        files = [path] + [f for f in self.recent_files() if f != path]
        self.q.setValue("recent/files", files[:MAX_RECENT])

    def clear_recent(self) -> None:
        self.q.setValue("recent/files", [])

    # -- last folders ---------------------------------------------------------------------------
    def last_folder(self, kind: str) -> str:
        folder = str(self.get(f"folders/{kind}", "") or "")
        if folder and Path(folder).is_dir():
            return folder
        other = str(self.get("folders/model", "") or "")
        return other if other and Path(other).is_dir() else str(Path.home())

    def remember_folder(self, kind: str, path: str | Path) -> None:
        p = Path(path)
        self.q.setValue(f"folders/{kind}", str(p if p.is_dir() else p.parent))

    # -- ANP settings ---------------------------------------------------------------------------
    def anp_config(self) -> ANPConfig:
        """The last ANP settings used, or the reference defaults (bad stored values are ignored)."""
        raw = self.get("anp/config", "")
        try:
            stored = json.loads(raw) if raw else {}
            known = {f.name for f in fields(ANPConfig)}
            return ANPConfig(**{k: v for k, v in stored.items() if k in known})
        except (ValueError, TypeError, anp_onnx.AnpOnnxError):
            return ANPConfig()

    def set_anp_config(self, config: ANPConfig) -> None:
        self.q.setValue("anp/config", json.dumps(config.to_dict()))


@dataclass
class Session:
    """Everything produced so far for the open model; later steps are reset when an earlier changes.

    The pages share what they know only through here (and the window's signals): each page writes
    the facts it produces and reads those of the others. The Settings step's ANP settings
    (``anp_config``) and the Export step's ``unlearn`` are not products of the model and outlive
    :meth:`reset_from`.
    """

    repairer: Optional[anp_onnx.Repairer] = None
    info: Optional[anp_onnx.ModelInfo] = None
    random_parity: Optional[float] = None
    conversion_problem: str = ""                   # why the conversion check failed ("" when it passed)
    clean: Optional[anp_onnx.ImageSet] = None      # as loaded
    train: Optional[anp_onnx.ImageSet] = None      # clean minus the held-out part: what ANP sees
    holdout: Optional[anp_onnx.ImageSet] = None
    test: Optional[anp_onnx.ImageSet] = None       # optional clean test set
    poisoned: Optional[anp_onnx.ImageSet] = None   # optional triggered test set
    target: Optional[int] = None
    data_parity: Optional[float] = None
    masks: Optional[dict] = None
    mean_masks: Optional[dict] = None              # tie-breakers for the neuron ranking
    suspected_target: Optional[int] = None         # from the collapse probe: drives the automatic choice
    mask_result: Optional[anp_onnx.MaskResult] = None
    masks_config: Optional[ANPConfig] = None       # the resolved settings the masks were learnt with (None: loaded)
    masks_source: str = ""
    curve: Any = None
    curve_where: str = ""
    choice: Optional[anp_onnx.PruneSpec] = None    # what the Prune step asked for (auto, count, threshold)
    plan: Optional[anp_onnx.PrunePlan] = None      # what the export prunes (the library's rule applied)
    export: Optional[anp_onnx.ExportResult] = None
    anp_config: Optional[ANPConfig] = None         # the Settings step's values; None while they are invalid
    anp_problem: str = ""                          # why they are invalid
    unlearn: bool = True                           # the Export step's "unlearn the suspected trigger"

    @property
    def model_path(self) -> Optional[Path]:
        return self.repairer.model.path if self.repairer is not None else None

    @property
    def model_usable(self) -> bool:
        """A model is open and its conversion check passed: data can be loaded and masks learnt for it."""
        return self.repairer is not None and not self.conversion_problem

    def run_config(self) -> ANPConfig:
        """The Settings step's values made concrete for this machine (AnpOnnxError when they are invalid)."""
        if self.anp_config is None:
            raise anp_onnx.SettingsError(self.anp_problem or "the ANP settings are not set")
        return self.anp_config.resolve()

    def refinements(self) -> tuple[str, ...]:
        """The refinements the export runs after the pruning: the unlearning, when asked and clean images are there."""
        return ("unlearn",) if self.unlearn and self.train is not None else ()

    def nothing_pruned_for_refinements(self) -> bool:
        """The Prune step's automatic choice prunes nothing because the refinements will run (the library's
        rule, :func:`anp_onnx.effective_pruning`)."""
        return self.plan is not None and self.choice is not None and self.plan.spec != self.choice

    def eval_set(self) -> tuple[Optional[anp_onnx.ImageSet], str]:
        """Clean images to report accuracy before/after on (never used to decide), and their description."""
        if self.test is not None:
            return self.test, f"the clean test set ({len(self.test)} images)"
        return self.curve_set()

    def curve_set(self) -> tuple[Optional[anp_onnx.ImageSet], str]:
        """Clean images the pruning curve and the automatic choice are measured on."""
        if self.holdout is not None:
            return self.holdout, f"{len(self.holdout)} held-out clean images"
        if self.train is not None:
            return self.train, f"the {len(self.train)} images ANP learnt from (none held out)"
        return None, ""

    def reset_from(self, step: str) -> None:
        """Forget what depends on ``step`` ("model", "data", "masks", "plan")."""
        order = ["model", "data", "masks", "plan"]
        level = order.index(step)
        if level <= 0:
            self.repairer = self.info = self.random_parity = None
            self.conversion_problem = ""
        if level <= 1:
            self.clean = self.train = self.holdout = self.test = self.poisoned = None
            self.target = self.data_parity = None
        if level <= 2:
            self.masks = self.mean_masks = self.mask_result = self.suspected_target = self.masks_config = None
            self.masks_source = ""
            self.curve, self.curve_where = None, ""
        if level <= 3:
            self.plan = self.export = self.choice = None
