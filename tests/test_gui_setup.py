"""Starting the app on a machine without the libraries of Qt's xcb plugin: one line with the apt
command instead of Qt's abort (issue #14). The lookups of the system (ldd, loading the plugin) are
given as stand-ins where a test needs a particular answer; the last test runs the real check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gui.platform_check import debian_package, message, missing_libraries, wants_xcb, xcb_problem

ROOT = Path(__file__).resolve().parents[1]
LDD = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibQt6XcbQpa.so.6 => /venv/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxkbcommon-x11.so.0 => not found
"""


def test_debian_package_names_follow_the_soname():
    assert debian_package("libxcb-icccm.so.4") == "libxcb-icccm4"
    assert debian_package("libxcb-keysyms.so.1") == "libxcb-keysyms1"
    assert debian_package("libxkbcommon-x11.so.0") == "libxkbcommon-x11-0"
    assert debian_package("libX11-xcb.so.1") == "libx11-xcb1"
    assert debian_package("libxcb-render-util.so.0") == "libxcb-render-util0"
    assert debian_package("libEGL.so.1") == "libegl1"
    assert debian_package("libglib-2.0.so.0") == "libglib2.0-0"


def test_missing_libraries_come_from_ldd_or_else_from_loading_the_plugin():
    plugin = Path("/venv/PySide6/Qt/plugins/platforms/libqxcb.so")
    assert missing_libraries(plugin, run=lambda cmd: LDD) == [
        "libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxkbcommon-x11.so.0"]

    def no_ldd(cmd):
        raise FileNotFoundError("ldd")

    def load(path):
        raise OSError("libxcb-icccm.so.4: cannot open shared object file: No such file or directory")

    assert missing_libraries(plugin, run=no_ldd, load=load) == ["libxcb-icccm.so.4"]
    assert missing_libraries(plugin, run=no_ldd, load=lambda path: None) == []
    line = message(["libxcb-icccm.so.4", "libxcb-keysyms.so.1"], apt=True)
    assert "\n" not in line and line.endswith("sudo apt-get install libxcb-icccm4 libxcb-keysyms1")


def test_the_check_runs_only_where_qt_will_use_xcb():
    assert wants_xcb({}, [], "linux")
    assert wants_xcb({"QT_QPA_PLATFORM": "xcb"}, [], "linux")
    assert not wants_xcb({"QT_QPA_PLATFORM": "offscreen"}, [], "linux")
    assert not wants_xcb({"XDG_SESSION_TYPE": "wayland"}, [], "linux")
    assert not wants_xcb({}, ["-platform", "offscreen"], "linux")
    assert wants_xcb({"QT_QPA_PLATFORM": "offscreen"}, ["-platform", "xcb"], "linux")
    assert not wants_xcb({}, [], "darwin") and not wants_xcb({}, [], "win32")
    assert xcb_problem(env={"QT_QPA_PLATFORM": "offscreen"}) is None
    assert xcb_problem(env={"ANP_ONNX_GUI_NO_CHECK": "1"}) is None


def test_the_app_says_what_to_install_before_qt_fails():
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "XDG_SESSION_TYPE")}
    expected = xcb_problem(env=env)
    if expected is None:
        pytest.skip("this machine has every library of Qt's xcb plugin")
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-m", "gui"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=60)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip() == expected and "sudo apt-get install" in expected
    assert "could not load the Qt platform plugin" not in run.stderr
