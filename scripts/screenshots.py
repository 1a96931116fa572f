"""Screenshots of each step of the desktop app, taken from the real window (offscreen).

    QT_QPA_PLATFORM=offscreen python scripts/screenshots.py            # sample model, if present
    QT_QPA_PLATFORM=offscreen python scripts/screenshots.py --tiny     # a tiny random model, seconds

Drives gui.main_window.MainWindow through Model -> Data -> Settings -> Run -> Prune -> Export and
saves docs/screenshots/01_model.png ... 06_export.png in the default (light) palette, and the Prune
step once more in a dark palette (gui.theme.dark_palette): 05_prune_dark.png (--no-dark: not). With
sample_models/ present it repairs sample_models/badnets_preact.onnx with the bundled clean images
and (subsets of) the bundled test sets; otherwise, or with --tiny, it builds a tiny model and random
images. Everything written (settings, exported model) goes to a temporary folder. It prints what
the Prune and Export steps said (the figures the README quotes). Re-run it whenever the UI changes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_MODEL = ROOT / "sample_models" / "badnets_preact.onnx"
SAMPLE_DATA = ROOT / "sample_models" / "data"
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="folder for the PNGs")
    p.add_argument("--tiny", action="store_true", help="use a tiny random model instead of the sample model")
    p.add_argument("--iterations", type=int, default=None, help="ANP iterations (default: 60 sample, 200 tiny)")
    p.add_argument("--batch-size", type=int, default=32, help="ANP batch size")
    p.add_argument("--test-images", type=int, default=300, help="images kept from each bundled test set")
    p.add_argument("--size", default="1280x860", help="window size, WIDTHxHEIGHT")
    p.add_argument("--no-dark", action="store_true", help="do not write 05_prune_dark.png")
    return p.parse_args()


def prepare(tmp: Path, tiny: bool, n_test: int) -> dict:
    """Model and data paths: the sample model with subsets of its test sets, or a tiny model."""
    import numpy as np

    import anp_onnx
    from anp_onnx.data import save_npz

    if not tiny and SAMPLE_MODEL.is_file() and (SAMPLE_DATA / "clean_500_folder").is_dir():
        paths = {"model": SAMPLE_MODEL, "clean": SAMPLE_DATA / "clean_500_folder"}
        sys.path.insert(0, str(ROOT / "sample_models"))
        from triggers import main as make_triggered

        make_triggered(["badnets", str(SAMPLE_DATA / "test_clean.npz"), str(tmp / "test_badnets.npz")])
        for key, path in (("test", SAMPLE_DATA / "test_clean.npz"), ("poisoned", tmp / "test_badnets.npz")):
            images = anp_onnx.load_images(path, size=None, channels=3)
            keep = np.random.default_rng(0).permutation(len(images))[:n_test]
            subset = images.subset(np.sort(keep))
            out = tmp / f"{key}_{n_test}.npz"
            save_npz(anp_onnx.ImageSet(subset.x, subset.y, CIFAR10, str(out)), out)
            paths[key] = out
        return paths
    sys.path.insert(0, str(ROOT / "tests"))
    from builders import random_images, tiny_model

    model = tiny_model(tmp / "tiny.onnx")
    paths = {"model": model}
    for key, n, seed in (("clean", 128, 0), ("test", 96, 1), ("poisoned", 96, 2)):
        images = random_images(n, seed=seed)
        save_npz(anp_onnx.ImageSet(images.x, images.y, CIFAR10, key), tmp / f"{key}.npz")
        paths[key] = tmp / f"{key}.npz"
    return paths


def main() -> int:
    args = parse_args()
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([sys.argv[0]])
    from gui.main_window import MainWindow

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="anp_onnx_screens_") as tmp_name:
        tmp = Path(tmp_name)
        paths = prepare(tmp, args.tiny, args.test_images)
        tiny = paths["model"] == tmp / "tiny.onnx"
        iterations = args.iterations or (200 if tiny else 60)
        win = MainWindow(QSettings(str(tmp / "settings.ini"), QSettings.Format.IniFormat))
        width, height = (int(v) for v in args.size.split("x"))
        win.resize(width, height)
        win.show()

        def wait(condition, timeout: float = 3600.0) -> None:
            end = time.monotonic() + timeout
            while not condition():
                app.processEvents()
                time.sleep(0.02)
                if time.monotonic() > end:
                    raise TimeoutError("the app did not get there in time")
            settle()

        def settle(seconds: float = 0.4) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                app.processEvents()
                time.sleep(0.02)

        def shot(name: str) -> None:
            settle()
            path = args.out / name
            win.grab().save(str(path))
            print(f"wrote {path}", flush=True)

        def idle() -> bool:
            return not win.runner.busy

        def check() -> None:
            shown = [box.text() for box in win.errors if box.isVisible()]
            if shown:
                raise SystemExit(f"the app showed an error: {shown[0]}")

        print(f"model {paths['model']}, {iterations} iterations of {args.batch_size}", flush=True)
        win.open_model(str(paths["model"]))
        wait(idle)
        check()
        shot("01_model.png")

        win.go_to("data")
        for key in ("clean", "test", "poisoned"):
            win.data_page.load(key, str(paths[key]))
            wait(idle)
            check()
        shot("02_data.png")

        win.go_to("settings")
        win.settings_page.set_values(iterations=iterations, batch_size=args.batch_size)
        shot("03_settings.png")

        win.go_to("run")
        win.run_page.start()
        wait(lambda: win.run_page.progress.value() >= 0.6 * iterations)
        win.run_page.loss_plot.redraw()
        shot("04_run.png")
        wait(lambda: win.run_page.state != "running")
        check()
        print(f"run {win.run_page.state}: {win.run_page.eta.text()}", flush=True)

        win.go_to("prune")
        wait(lambda: idle() and win.session.curve is not None)
        check()
        win.prune_page.use_automatic()
        shot("05_prune.png")
        if not args.no_dark:  # the same window in a dark theme: what follows the palette changes with it
            from gui.theme import dark_palette

            light = app.palette()
            app.setPalette(dark_palette())
            shot("05_prune_dark.png")
            app.setPalette(light)
        print(f"prune: {win.prune_page.summary.text()}", flush=True)
        print(f"curve: {win.prune_page.curve_info.text()}", flush=True)

        win.go_to("export")
        win.export_page.output.setText(str(tmp / f"{paths['model'].stem}_repaired.onnx"))
        win.export_page.export()
        wait(idle)
        check()
        shot("06_export.png")
        for label in (win.export_page.file_verdict, win.export_page.repair_verdict, win.export_page.result):
            print(f"export: {label.text()}", flush=True)
        win.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
