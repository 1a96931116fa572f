"""Does the collapse probe name a target on a model WITHOUT a backdoor? (false-positive check)

    python benchmarks/probe_clean_model.py [--epochs 12] [--shared ../shared] [--save DIR]

Trains the sample models' PreActResNet-mini with sample_models/make_samples.py's recipe but no
poisoned images (so it needs ../shared/data/cifar10, like make_samples.py), exports it to ONNX in a
temporary folder with BatchNorm kept and with BatchNorm folded (as badnets_preact_folded.onnx), then
runs the collapse probe (anp_onnx.collapse.find_target) on the bundled 500 clean images, exactly as
ANP does before optimising (renormalising the folded model's neurons first), and prints what it
found next to the bundled backdoored models' probes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_models"))


def probe(path: Path):
    import anp_onnx
    from anp_onnx.calibrate import calibrate
    from anp_onnx.collapse import find_target

    rep = anp_onnx.Repairer.open(path)
    clean = rep.load_data(ROOT / "sample_models" / "data" / "clean_500.npz")
    calibrate(rep.net, rep.modules.values(), clean)  # BN folded away: renormalise (as ANPConfig does)
    return find_target(rep.net, rep.modules.values(), clean)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=12, help="training epochs (default 12: about 3 min on 2 cores)")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="folder holding data/cifar10")
    p.add_argument("--save", type=Path, help="also keep the two clean ONNX files in this folder "
                                             "(clean_preact.onnx, clean_preact_folded.onnx: bench rows)")
    args = p.parse_args(argv)
    if not (args.shared / "data" / "cifar10").is_dir():
        print(f"error: {args.shared / 'data' / 'cifar10'} not found (pass --shared)", file=sys.stderr)
        return 2

    import make_samples as ms

    ms.POISON_RATE = 0.0  # the same recipe, no poisoned images
    data = ms.prepare_data(args.shared.resolve())
    model, info = ms.train_backdoored("badnets", data, args.epochs, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clean_preact.onnx"
        ms.export_onnx(model, path, keep_bn=True)
        ms.export_onnx(ms.fold_preact(model)[0], Path(tmp) / "clean_preact_folded.onnx", keep_bn=False)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            for name in ("clean_preact.onnx", "clean_preact_folded.onnx"):
                shutil.copyfile(Path(tmp) / name, args.save / name)
        result = probe(path)
        folded = probe(Path(tmp) / "clean_preact_folded.onnx")
    print(f"clean PreActResNet-mini, {args.epochs} epochs, validation accuracy {info['history'][-1]['val_acc']:.3f}:")
    print(f"  BN kept:   {result.describe()} (runner-up ratio {result.ratio:.1f})")
    print(f"  BN folded: {folded.describe()} (runner-up ratio {folded.ratio:.1f})")
    for name in ("badnets_preact", "badnets_preact_folded", "blend_preact", "sig_preact", "ibau_badnets_vgg",
                 "ibau_trojan_vgg"):
        r = probe(ROOT / "sample_models" / f"{name}.onnx")
        print(f"{name}: {r.describe()} (runner-up ratio {r.ratio:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
