"""Entry point of the desktop app: ``anp-onnx-gui [model.onnx]`` or ``python -m gui``.

Qt is imported only once :mod:`gui.platform_check` has found nothing missing: a machine without the
libraries of Qt's xcb plugin gets one line with the command that installs them, not Qt's abort.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional, Sequence

from .platform_check import CANNOT_OPEN, message, xcb_problem


def _excepthook(kind, value, tb) -> None:
    """An exception escaping a slot: show it and keep running instead of crashing."""
    from PySide6.QtWidgets import QApplication

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
    problem = xcb_problem(qt_args)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    try:
        from PySide6.QtWidgets import QApplication
    except ImportError as exc:  # a library Qt itself needs (libEGL, libfontconfig, ...) is missing
        missing = CANNOT_OPEN.search(str(exc))
        if missing is None:
            raise
        import shutil

        print(message([missing.group(1)], shutil.which("apt-get") is not None, what="Qt"), file=sys.stderr)
        return 1

    from .state import APPLICATION, ORGANIZATION

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
