"""Entry point of the desktop app: ``anp-onnx-gui [model.onnx]`` or ``python -m gui``."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional, Sequence

from PySide6.QtWidgets import QApplication

from .state import APPLICATION, ORGANIZATION


def _excepthook(kind, value, tb) -> None:
    """An exception escaping a slot: show it and keep running instead of crashing."""
    details = "".join(traceback.format_exception(kind, value, tb))
    sys.stderr.write(details)
    app = QApplication.instance()
    if app is None or kind is KeyboardInterrupt:
        return
    from .dialogs import show_error

    show_error(app.activeWindow(), "Unexpected error",
               f"{kind.__name__}: {value}\n\nThis is a bug in anp-onnx; the app keeps running.", details)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="anp-onnx-gui", description="Desktop app of anp-onnx.")
    parser.add_argument("model", nargs="?", help="ONNX model to open at start")
    args, qt_args = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    QApplication.setOrganizationName(ORGANIZATION)
    QApplication.setApplicationName(APPLICATION)
    app = QApplication.instance() or QApplication([sys.argv[0], *qt_args])
    from .main_window import MainWindow

    sys.excepthook = _excepthook
    window = MainWindow()
    window.show()
    if args.model:
        window.open_model(args.model)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
