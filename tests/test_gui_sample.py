"""'Try a sample': one click loads the bundled backdoored model and every data set, and shows the
attack success rate a first-time user came to see (issue #14)."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from gui_support import ROOT, TIMEOUT, settings, visible_errors, win  # noqa: F401 - fixtures by name

pytestmark = pytest.mark.skipif(not (ROOT / "sample_models" / "badnets_preact.onnx").is_file(),
                                reason="needs the bundled sample models")


def test_try_a_sample_loads_the_model_its_data_and_the_triggered_test_set(qtbot, win):
    assert win.model_page.sample_button.isEnabled() and win.sample_action.isEnabled()
    with qtbot.waitSignal(win.sampleLoaded, timeout=4 * TIMEOUT):
        qtbot.mouseClick(win.model_page.sample_button, Qt.MouseButton.LeftButton)
    s = win.session
    assert s.model_path.name == "badnets_preact.onnx" and not s.conversion_problem
    assert len(s.clean) == 500 and len(s.test) == 1000 and len(s.poisoned) == 1000
    assert s.target == 0 and win.data_page.preset.currentData() == "unit"
    assert (s.poisoned.y == s.test.y).all() and not (s.poisoned.x == s.test.x).all()  # triggered, true labels
    info = win.data_page.test_info.text()
    assert "attack success rate" in info
    asr = float(info.split("attack success rate ")[1].split("%")[0])
    assert asr > 90  # the backdoor works on the original model
    assert win.stack.currentWidget() is win.data_page and win.run_page.ready()
    folder = win.sample_dir
    assert folder is not None and (folder / "test_badnets.npz").is_file()
    assert not visible_errors(win)
    win.close()
    assert not folder.exists()  # the triggered copy goes with the window
