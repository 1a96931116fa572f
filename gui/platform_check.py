"""Before any Qt window: can Qt's X11 platform plugin (xcb) load on this machine?

On a plain Debian or Ubuntu desktop, PySide6's wheel brings Qt but not every system library its
xcb plugin links to (typically ``libxcb-icccm4`` and ``libxcb-keysyms1``); Qt then aborts with
"could not load the Qt platform plugin xcb" and a page of hints. :func:`xcb_problem` finds the
missing libraries first (``ldd`` on the plugin, else the error of loading it) and says, in one
line, which packages to install. Nothing here imports Qt: it must run before Qt can fail.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

#: Libraries whose Debian package name does not follow the soname rule (see :func:`debian_package`).
PACKAGES = {"libglib-2.0.so.0": "libglib2.0-0", "libgthread-2.0.so.0": "libglib2.0-0",
            "libdbus-1.so.3": "libdbus-1-3", "libxcb-util.so.1": "libxcb-util1"}
NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)
CANNOT_OPEN = re.compile(r"(\S+\.so[.\d]*): cannot open shared object file")


def debian_package(soname: str) -> str:
    """The Debian/Ubuntu package of a library: ``libxcb-icccm.so.4`` -> ``libxcb-icccm4``."""
    if soname in PACKAGES:
        return PACKAGES[soname]
    name, _, version = soname.partition(".so")
    version = version.lstrip(".").split(".")[0]
    if not version:
        return name.lower()
    return (name + ("-" if name[-1].isdigit() else "") + version).lower()


def xcb_plugin() -> Optional[Path]:
    """PySide6's xcb plugin, found without importing Qt (None when PySide6 or the plugin is absent)."""
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    plugin = Path(list(spec.submodule_search_locations)[0]) / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    return plugin if plugin.is_file() else None


def wants_xcb(env: Mapping[str, str], qt_args: Sequence[str], platform: str = sys.platform) -> bool:
    """Whether Qt will try the xcb plugin first: Linux, no other platform asked for, not a Wayland session."""
    if not platform.startswith("linux"):
        return False
    args = list(qt_args)
    if "-platform" in args and args.index("-platform") + 1 < len(args):
        return args[args.index("-platform") + 1].split(":")[0].split(";")[0] == "xcb"
    asked = env.get("QT_QPA_PLATFORM", "")
    if asked:
        return asked.split(":")[0].split(";")[0] == "xcb"
    return env.get("XDG_SESSION_TYPE", "") != "wayland"


def missing_libraries(plugin: Path, run: Callable[[list[str]], str] = None,
                      load: Callable[[str], None] = None) -> list[str]:
    """Shared libraries the plugin needs and the system lacks, in the order ``ldd`` lists them."""
    run = run or _ldd
    try:
        return list(dict.fromkeys(NOT_FOUND.findall(run(["ldd", str(plugin)]))))
    except (OSError, subprocess.SubprocessError):
        pass  # no ldd: loading the plugin names the first missing library
    try:
        (load or ctypes.CDLL)(str(plugin))
    except OSError as exc:
        found = CANNOT_OPEN.search(str(exc))
        return [found.group(1)] if found else []
    return []


def _ldd(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        raise FileNotFoundError(command[0])
    return subprocess.run(command, capture_output=True, text=True, timeout=20, check=False).stdout


def message(missing: Sequence[str], apt: bool, what: str = "Qt's X11 platform plugin (xcb)") -> str:
    """One line: what cannot load, the libraries missing, and the command that installs them."""
    libs = ", ".join(missing)
    if apt:
        packages = " ".join(dict.fromkeys(debian_package(m) for m in missing))
        return f"anp-onnx-gui: {what} cannot load: {libs} missing; install with: sudo apt-get install {packages}"
    return f"anp-onnx-gui: {what} cannot load: {libs} missing; install the system packages that provide them"


def xcb_problem(qt_args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The one-line explanation when the xcb plugin cannot load, else None (also when it is not used).

    ``ANP_ONNX_GUI_NO_CHECK=1`` skips the check.
    """
    env = os.environ if env is None else env
    if env.get("ANP_ONNX_GUI_NO_CHECK") == "1" or not wants_xcb(env, qt_args):
        return None
    plugin = xcb_plugin()
    missing = missing_libraries(plugin) if plugin is not None else []
    return message(missing, apt=shutil.which("apt-get") is not None) if missing else None
