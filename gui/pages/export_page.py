"""Step 6: write the repaired model (verified in onnxruntime), the masks and the report.

The work is the library's tail, :meth:`anp_onnx.Repairer.finish`; this page asks where to write,
confirms before replacing files, and shows the :class:`anp_onnx.RepairResult`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6.QtCore import QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QPushButton, QScrollArea, QVBoxLayout, QWidget,
)

import anp_onnx
from anp_onnx import RepairResult, default_masks_path, mask_values_path, report_paths

from ..dialogs import confirm
from ..verdict import judge
from .base import ERROR, GOOD, MUTED, WARN, Page, esc, pct, rich
from .prune_page import nothing_pruned_note


class ExportPage(Page):
    title = "6. Export"
    subtitle = "The repaired model is the original file with the pruned neurons switched off. It is checked " \
               "with onnx and re-run in onnxruntime before the app reports success."

    exportFinished = Signal(str)  # "done" or "failed"

    def __init__(self, window) -> None:
        super().__init__(window)
        form = QFormLayout()
        row = QWidget(self)
        h = QHBoxLayout(row)
        h.setContentsMargins(0, 0, 0, 0)
        self.output = QLineEdit(row)
        self.output.setObjectName("outputPath")
        self.browse_button = QPushButton("Browse…", row)
        self.browse_button.setObjectName("browseOutput")
        self.browse_button.clicked.connect(self.browse)
        h.addWidget(self.output, 1)
        h.addWidget(self.browse_button)
        form.addRow("Repaired model", row)
        self.save_masks = QCheckBox("Save the masks next to it (.masks.json and .mask_values.txt)", self)
        self.save_masks.setObjectName("saveMasksCheck")
        self.save_masks.setChecked(True)
        self.save_report = QCheckBox("Save a report next to it (.report.md and .report.json, with plots)", self)
        self.save_report.setObjectName("saveReportCheck")
        self.save_report.setChecked(True)
        self.unlearn = QCheckBox("Unlearn the suspected trigger first (recommended; changes weights)", self)
        self.unlearn.setObjectName("unlearnCheck")
        self.unlearn.setToolTip("Reconstructs a trigger for the suspected target (and the class a per-class scan "
                                "finds) on the clean images and unlearns it; kept only while held-out accuracy "
                                "stays within 3 points. Skipped when no backdoor is suspected. Takes minutes; pruning "
                                "alone rarely removed backdoors of models trained by others.")
        self.unlearn.setChecked(self.session.unlearn)
        self.unlearn.toggled.connect(self._unlearn_toggled)
        form.addRow("", self.unlearn)
        form.addRow("", self.save_masks)
        form.addRow("", self.save_report)
        self.body.addLayout(form)
        self.plan_label = rich(self, "", "exportPlan")
        self.body.addWidget(self.plan_label)
        self.export_button = QPushButton("Export repaired model", self)
        self.export_button.setObjectName("exportButton")
        self.export_button.clicked.connect(self.export)
        self.open_folder_button = QPushButton("Open containing folder", self)
        self.open_folder_button.setObjectName("openFolderButton")
        self.open_folder_button.setToolTip("Show the exported files in the file manager")
        self.open_folder_button.clicked.connect(self.open_folder)
        self.open_folder_button.hide()
        self.open_url = QDesktopServices.openUrl  # how a folder is shown (the tests record the URL instead)
        h2 = QHBoxLayout()
        h2.addWidget(self.export_button)
        h2.addWidget(self.open_folder_button)
        h2.addStretch(1)
        self.body.addLayout(h2)
        results = QWidget(self)
        column = QVBoxLayout(results)
        column.setContentsMargins(0, 0, 0, 0)
        self.file_verdict = rich(results, "", "fileVerdict")
        self.repair_verdict = rich(results, "", "repairVerdict")
        self.result = rich(results, "", "exportResult")
        for label in (self.file_verdict, self.repair_verdict, self.result):
            column.addWidget(label)
        column.addStretch(1)
        scroll = QScrollArea(self)  # the verdicts, the figures and the files: scrolled, never cut off
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(results)
        self.body.addWidget(scroll, 1)
        self._default_for = None
        self.verdict = None  # the last export's RepairVerdict
        self.last_result: Optional[RepairResult] = None

    def ready(self) -> bool:
        return self.session.plan is not None

    def set_busy(self, busy: bool) -> None:
        for w in (self.output, self.browse_button, self.export_button, self.unlearn, self.save_masks,
                  self.save_report):
            w.setEnabled(not busy)

    def refresh(self) -> None:
        s = self.session
        src = s.model_path
        if src is not None and self._default_for != src:
            self._default_for = src
            folder = Path(self.settings.get("folders/export", "") or src.parent)
            folder = folder if folder.is_dir() else src.parent
            self.output.setText(str(folder / f"{src.stem}_repaired.onnx"))
        if s.plan is None:
            self.plan_label.setText("<i>Choose what to prune at the Prune step first.</i>")
        elif s.nothing_pruned_for_refinements():
            self.plan_label.setText(f"{nothing_pruned_note()} Will prune <b>0 of {s.plan.total} neurons</b> "
                                    f"(the automatic choice alone: {s.curve.chosen.count}); masks: "
                                    f"{esc(s.masks_source)}.")
        else:
            self.plan_label.setText(f"Will prune <b>{s.plan.count} of {s.plan.total} neurons</b> "
                                    f"({esc(s.plan.spec.describe())}); masks: {esc(s.masks_source)}.")
        if s.export is None:
            self.clear_result()

    def _unlearn_toggled(self, on: bool) -> None:
        """The unlearning decides what the automatic choice prunes (nothing, without a backdoor signal)."""
        self.session.unlearn = on
        self.win.prune_page.refinements_changed()
        self.refresh()

    def clear_result(self, text: str = "") -> None:
        self.open_folder_button.hide()
        self.file_verdict.setText("")
        self.repair_verdict.setText("")
        self.result.setText(text)

    def browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the repaired model", self.output.text(),
                                              "ONNX models (*.onnx)")
        if path:
            self.output.setText(path if path.endswith(".onnx") else path + ".onnx")

    def export(self) -> None:
        s = self.session
        text = self.output.text().strip()
        if s.plan is None or self.win.runner.busy:
            return
        if not text:
            self.win.error("No output file", "choose where to save the repaired model")
            return
        out = Path(text).expanduser()
        if not out.is_absolute():
            out = s.model_path.parent / out
        replace_input = out.resolve() == s.model_path.resolve()
        masks_json = default_masks_path(out)
        extras = ([masks_json, mask_values_path(masks_json)] if self.save_masks.isChecked() else []) + \
            (list(report_paths(out).values()) if self.save_report.isChecked() else [])
        if replace_input:
            if len(s.repairer.model.external_tensors):
                self.win.error("Cannot replace the input", "the input model keeps its weights in a separate data "
                               "file; save the repaired model under a new name")
                return
            if not confirm(self, "Replace the original model?",
                           f"{out.name} is the model you opened. Replacing it loses the original (backdoored) "
                           "model for good. Replace it with the repaired model?", yes="Replace original"):
                self.win.log.note("export cancelled: the input model was not replaced")
                return
        if not out.parent.exists():
            if not confirm(self, "Create the folder?", f"The folder {out.parent} does not exist. Create it and "
                           "export there?", yes="Create folder"):
                return
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self.win.error("Cannot create the folder", f"{out.parent}: {exc.strerror or exc}")
                return
            self.win.log.note(f"created the folder {out.parent}")
        existing = [p for p in [out, *extras] if p.exists() and not (replace_input and p == out)]
        # a report without a pruning curve has no curve plot: an earlier export's is removed, not left stale
        stale = report_paths(out)["curve"] if self.save_report.isChecked() and s.curve is None else None
        removed = [p for p in existing if p == stale]
        replaced = [p for p in existing if p != stale]
        message = ("These files exist and will be replaced:\n" + "\n".join(str(p) for p in replaced)
                   if replaced else "")
        if removed:
            message += ("\n\n" if message else "") + ("This export has no pruning curve, so the curve plot of an "
                                                       "earlier export will be removed:\n" + str(removed[0]))
        if existing and not confirm(self, "Replace existing files?", message, yes="Replace"):
            return
        self.settings.remember_folder("export", out)
        self.clear_result("exporting and verifying…")
        self.win.runner.start("Export", self._job(out, replace_input, bool(existing)),
                              on_success=self._done, on_failure=self._failed)

    def _job(self, out: Path, replace_input: bool, overwrite: bool):
        """Worker job: the library's tail (write back, verify, masks, before/after evaluation, report)."""
        s = self.session
        rep, plan, masks, curve, verify = s.repairer, s.plan, s.masks, s.curve, s.train
        evaluation = anp_onnx.Evaluation(s.test, s.poisoned, s.target, s.holdout)
        save_masks, report = self.save_masks.isChecked(), self.save_report.isChecked()
        optimisation = s.mask_result
        config = s.masks_config if optimisation is not None else None
        meta = {"data": verify.source} if verify is not None else {}
        source, mean_masks = s.masks_source, s.mean_masks
        refinements = s.refinements()  # the ones the Prune step's plan was made for

        def job(progress, cancel):
            return rep.finish(plan, masks, out, save_masks=save_masks, optimisation=optimisation, config=config,
                              curve=curve, evaluation=evaluation, verify_images=verify, report=report,
                              overwrite=overwrite, metadata=meta, masks_source=source,
                              replace_input=replace_input, mean_masks=mean_masks, refinements=refinements,
                              refine_data=verify, progress=progress, cancel=cancel)

        return job

    def _done(self, result: RepairResult) -> None:
        self.session.export = result.export
        diff = result.export.max_abs_diff
        self.file_verdict.setText(
            f"<b>The file is valid: <span style='color:{GOOD}'>PASSED</span></b>. {esc(result.export.path)} was "
            f"written, checked by onnx and verified in onnxruntime: it gives the outputs of the pruned model "
            f"(largest difference {diff:.1e}).")
        verdict = judge(result)
        colour = {True: GOOD, False: WARN, None: MUTED}[verdict.good]
        lines = [f"<span style='color:{WARN}'>⚠ {esc(w)}</span>" for w in verdict.warnings] + \
            [f"✓ {esc(f)}" for f in verdict.findings]
        self.repair_verdict.setText(
            f"<b>The repair: <span style='color:{colour}'>{esc(verdict.headline)}</span></b>"
            + ("<br>" + "<br>".join(lines) if lines else ""))
        self.verdict, self.last_result = verdict, result
        text = ""
        rows = []
        hb, ha, b, a = result.holdout_before, result.holdout_after, result.before, result.after
        if hb is not None and ha is not None:
            rows.append((f"held-out clean accuracy ({hb.n_clean} images)", hb.accuracy, ha.accuracy))
        if b is not None and a is not None and b.accuracy is not None:
            rows.append((f"test accuracy ({b.n_clean} images)", b.accuracy, a.accuracy))
        if b is not None and a is not None and b.asr is not None:
            guess = ", guessed" if b.target_inferred else ""
            rows.append((f"attack success rate (target {b.target}{guess}; {b.n_poisoned} images)", b.asr, a.asr))
        if rows:
            text += "<table cellspacing='6'><tr><th></th><th>before</th><th>after</th></tr>" + "".join(
                f"<tr><td>{esc(name)}</td><td align='right'>{pct(x)}</td><td align='right'><b>{pct(y)}</b></td></tr>"
                for name, x, y in rows) + "</table>"
        if result.plan.count == 0 and result.refinements and self.session.nothing_pruned_for_refinements():
            text += ("<p>No neurons were pruned: with unlearning on, the automatic choice prunes nothing, so the "
                     "unlearning alone repaired the model.</p>")
        elif result.plan.count and result.refinements and self.session.nothing_pruned_for_refinements():
            text += (f"<p>The unlearning changed no weight, so the automatic choice pruned its "
                     f"{result.plan.count} neurons (the backdoor signal went on the curve).</p>")
        for name, facts in result.refinements.items():
            text += f"<p>Unlearning ({esc(name)}): {esc(anp_onnx.refinement_summary(facts))}.</p>"
        text += "<p>Files written:</p><ul>" + "".join(f"<li>{esc(f)}</li>" for f in result.files) + "</ul>"
        self.result.setText(text)
        self.open_folder_button.show()
        self.win.log.note(f"exported {result.export.path}")
        self.exportFinished.emit("done")

    def folder_url(self) -> Optional[QUrl]:
        """The folder the last export wrote to, as a URL for the file manager."""
        if self.last_result is None:
            return None
        return QUrl.fromLocalFile(str(Path(self.last_result.export.path).resolve().parent))

    def open_folder(self) -> None:
        url = self.folder_url()
        if url is not None and not self.open_url(url):
            self.win.error("Cannot open the folder", f"no file manager opened {url.toLocalFile()}")

    def _failed(self, failure) -> None:
        self.clear_result(f"<span style='color:{ERROR}'><b>Export failed:</b> {esc(failure.message)}</span> "
                          "Nothing was left half-written.")
        self.exportFinished.emit("failed")
