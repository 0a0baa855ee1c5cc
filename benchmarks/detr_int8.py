"""INT8 of a trained DETR: ONNX Runtime QDQ (the DETR rules, or naive), OpenVINO reading that QDQ model,
and NNCF's own INT8 of the float model, scored by held-out mAP.

The shipped MobileNetV3-large teacher (``builtin:detr-mnv3l-scenes``, the default teacher before the
ResNet-18 one) at the default run's 128 px, exported by
:func:`edgekd.export.detection.export_detector`, calibrated on ``--calib`` train scenes; every variant
scored on the same ``--val`` held-out scenes with :func:`edgekd.detection.evaluate.evaluate_detector`.
NNCF runs exactly as edgekd runs it (:func:`edgekd.quantize.nncf.quantize_openvino`, performance
preset, fast bias correction), with the DETR settings NNCF offers (``model_type=TRANSFORMER``, the heads
of :func:`edgekd.quantize.detr_rules.head_nodes` in the ignored scope) and without; the MIXED preset
(asymmetric activations) is the third NNCF variant, and the fourth keeps every MatMul's inputs in
float (NNCF's ignored scope by type; ignoring Convolution or the element-wise ops instead does not help,
measured once by hand). This is the measurement behind the detection
path's choice of the QDQ model on OpenVINO (:data:`edgekd.quantize.detr_rules.NNCF_MEASURED`).
Accuracy only, so it may share the machine.

    python benchmarks/detr_int8.py [--calib 128] [--val 300]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import onnx
from rich.table import Table

from edgekd import atomic, teachers
from edgekd.backends.openvino import _save_ir
from edgekd.backends.signal_stack import openvino_signal_stack
from edgekd.console import console
from edgekd.detection.evaluate import OpenVinoDetector, OrtDetector, evaluate_detector
from edgekd.detection.synthetic import load_synthetic
from edgekd.export.detection import export_detector
from edgekd.models import build_model
from edgekd.models.checkpoint import load_weights
from edgekd.quantize.calibration import CalibrationSet
from edgekd.quantize.detr_rules import GROUPS, head_nodes, quantize_detr_ort
from edgekd.quantize.nncf import quantize_openvino
from edgekd.report.build import environment

RESULTS = Path(__file__).resolve().parent / "results" / "detr_int8.json"
MODEL, SHIPPED, IMAGE_SIZE = "edgekd:detr-mnv3l", "detr-mnv3l-scenes", 128


def _nncf_detr_settings(fp32_onnx: Path, ov_model: Any) -> dict[str, Any]:
    """NNCF's transformer model type and the DETR heads (by their converted names) in the ignored scope."""
    import nncf

    proto = onnx.load(str(fp32_onnx), load_external_data=False)
    by_name = {node.name: node for node in proto.graph.node}
    wanted = {out for name in head_nodes(proto) for out in by_name[name].output} | set(head_nodes(proto))
    names = sorted(op.get_friendly_name() for op in ov_model.get_ops() if op.get_friendly_name() in wanted)
    return {
        "model_type": nncf.ModelType.TRANSFORMER,
        "ignored_scope": nncf.IgnoredScope(names=names, validate=False),
    }


def main() -> None:
    import nncf
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration train scenes")
    parser.add_argument("--val", type=int, default=300, help="held-out scenes scored")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    scores: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-detr-int8-") as temp, openvino_signal_stack():
        root = Path(temp)
        train_set, val_set = load_synthetic(root / "data", 0, IMAGE_SIZE, args.calib, args.val)
        model = build_model(MODEL, len(train_set.classes), 3, kwargs={"task": "detection"})
        load_weights(model, teachers.weights(SHIPPED), MODEL)
        fp32 = root / "fp32.onnx"
        export_detector(model.eval(), (3, IMAGE_SIZE, IMAGE_SIZE), fp32)
        calib = CalibrationSet(train_set.images, "built-in scenes, train split", "none", args.calib, 16)

        def score(name: str, runner: Any) -> None:
            evaluation, _ = evaluate_detector(runner, val_set)
            scores[name] = {"map": round(evaluation["map"], 4), "map50": round(evaluation["map50"], 4)}
            console.print(f"{name}: mAP {scores[name]['map']:.4f}")

        def score_ir(name: str, ov_model: Any) -> None:
            path = root / f"{name}.xml"
            _save_ir(ov_model, path, compress_to_fp16=False)
            score(name, OpenVinoDetector(path, None))

        score("onnxruntime fp32", OrtDetector(fp32))
        score_ir("openvino fp32", ov.convert_model(str(fp32)))
        for rules, groups in (("detr rules", GROUPS), ("naive", ())):
            qdq = root / f"qdq-{len(groups)}.onnx"
            quantize_detr_ort(fp32, qdq, calib, groups, per_channel=True, method="minmax")
            score(f"onnxruntime QDQ int8 ({rules})", OrtDetector(qdq))
            score_ir(f"openvino reads the QDQ int8 ({rules})", ov.convert_model(str(qdq)))
        nncf_variants = {
            "detr rules": lambda m: _nncf_detr_settings(fp32, m),
            "naive": lambda m: {},
            "detr rules, MIXED preset": lambda m: {
                **_nncf_detr_settings(fp32, m),
                "preset": nncf.QuantizationPreset.MIXED,
            },
            "MatMul inputs kept in float": lambda m: {
                "ignored_scope": nncf.IgnoredScope(types=["MatMul"], validate=False)
            },
        }
        for name, settings in nncf_variants.items():
            float_model = ov.convert_model(str(fp32))
            quantized, _ = quantize_openvino(float_model, calib, None, settings(float_model))
            score_ir(f"nncf int8 ({name})", quantized)
    result = {
        "benchmark": "detr_int8",
        "settings": {
            "model": f"builtin:{SHIPPED} ({MODEL})",
            "image_size": IMAGE_SIZE,
            "calibration_scenes": args.calib,
            "held_out_scenes": args.val,
            "qdq": "edgekd.quantize.detr_rules.quantize_detr_ort: per-channel weights, minmax",
            "nncf": "edgekd.quantize.nncf.quantize_openvino: performance preset, CPU, fast bias correction",
            "nncf_version": nncf.__version__,
            "openvino_version": ov.get_version(),
        },
        "scores": scores,
        "environment": environment(),
    }
    table = Table(title=f"INT8 of the shipped DETR teacher: held-out mAP on {args.val} scenes")
    for column in ("model", "mAP@[.5:.95]", "mAP@.5"):
        table.add_column(column)
    for name, row in scores.items():
        table.add_row(name, f"{row['map']:.4f}", f"{row['map50']:.4f}")
    console.print(table)
    atomic.write_json(args.out, result)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
