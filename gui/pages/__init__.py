"""One page per step of the workflow: Model, Data, Settings, Run, Prune, Export."""

from .data_page import DataPage
from .export_page import ExportPage
from .model_page import ModelPage
from .prune_page import PrunePage
from .run_page import RunPage
from .settings_page import SettingsPage

__all__ = ["ModelPage", "DataPage", "SettingsPage", "RunPage", "PrunePage", "ExportPage"]
