"""The calibrate stage: clean statistics for neurons whose layer does not normalise.

Layers without normalisation (conv/linear output channels, per-channel Mul/Add: BatchNorm fused
into the conv at export, or absent) are *renormalised*: perturbed as a BatchNorm channel with the
clean output's statistics placed after the layer (see :meth:`PerturbedModule.renormalise` and
``ANPConfig.renormalise``). :func:`calibrate` measures those statistics (the *centres*: each
neuron's clean mean, and the layer's spread); they travel in the masks file, because writing a
pruned renormalised neuron back into ONNX needs its mean.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .data import ImageSet
from .errors import DataError
from .neurons import PerturbedModule
from .progress import CancelToken, ProgressCallback, ProgressEvent, Stage, check, emit

_LOGGER = logging.getLogger(__name__)

#: Clean images used to calibrate renormalised neurons (all of them when the clean set is smaller).
CALIBRATION_IMAGES = 2048

#: Layer name -> (clean mean per neuron, spread per neuron) of a renormalised layer.
Centres = Mapping[str, tuple[np.ndarray, np.ndarray]]


@torch.no_grad()
def calibrate(net: nn.Module, modules: Iterable[PerturbedModule], data: ImageSet, device: str = "cpu",
              max_images: int = CALIBRATION_IMAGES, batch_size: int = 256, *,
              progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> int:
    """Renormalise the neurons that do not normalise: their clean outputs' mean and spread on ``data``.

    Runs the unperturbed model (eval mode, masks as they are, normally 1) on up to ``max_images``
    clean images and gives every such module whose write-back can take it (``centreable``) its
    per-neuron statistics (see :meth:`PerturbedModule.renormalise`). Returns the number of layers
    calibrated. Reports a :data:`Stage.CALIBRATE` event per batch and checks ``cancel`` before each;
    a cancelled calibration leaves every module as it was.
    """
    chosen = [m for m in modules if not m.normalises and m.centreable]
    if not chosen:
        return 0
    net.to(device).eval()
    for m in chosen:
        m.start_calibration()
    try:
        x = data.x[:max_images]
        total = -(-len(x) // batch_size)
        for step, start in enumerate(range(0, len(x), batch_size), start=1):
            check(cancel)
            net(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32)).to(device))
            emit(progress, ProgressEvent(Stage.CALIBRATE, step, total, message=f"{min(len(x), start + batch_size)} "
                                         f"of {len(x)} clean images"))
    except BaseException:
        for m in chosen:
            m.abort_calibration()
        raise
    for m in chosen:
        m.finish_calibration()
    _LOGGER.info("renormalised %d layers that do not normalise (statistics of %d clean images)",
                 len(chosen), len(x))
    return len(chosen)


def current_centres(modules: Mapping[str, PerturbedModule]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The renormalised layers' (centre, spread) per neuron."""
    return {name: (m.centre.float().cpu().numpy().copy(), m.spread.float().cpu().numpy().copy())
            for name, m in modules.items() if m.renormalised}


def set_centres(modules: Mapping[str, PerturbedModule], centres: Centres) -> None:
    """Renormalise exactly the layers named in ``centres`` (as saved with masks), the others not."""
    unknown = [name for name in centres if name not in modules]
    if unknown:
        raise DataError(f"the saved centres name layers this model does not have: {', '.join(unknown[:5])}")
    for name, m in modules.items():
        if name in centres:
            if m.normalises or not m.centreable:
                raise DataError(f"layer {name} cannot be renormalised, but the saved masks say it was")
            try:
                m.set_centres(*centres[name])
            except ValueError as exc:
                raise DataError(f"saved centres of {name}: {exc}") from None
        else:
            m.set_centres(None, None)


def clear_centres(modules: Iterable[PerturbedModule]) -> None:
    """No renormalisation: conv/linear neurons scale their weights directly."""
    for m in modules:
        m.set_centres(None, None)
