"""anp-onnx desktop app (PySide6): point-and-click ANP purification of ONNX classifiers.

Launch with ``anp-onnx-gui`` or ``python -m gui``. The app is a thin layer over the public API of
:mod:`anp_onnx`; long work runs in a worker thread fed by the library's progress events.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    from .app import main as _main

    return _main(argv)
