"""Detection artifacts (issue 12): DETR export with two named outputs and parity on both, the DETR INT8
rule set against naive full INT8, mAP of an artifact, the bundle's post-processing record and the
device runner's post-processing, on a tiny DETR and a few built-in scenes."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from edgekd.deployment import decide
from edgekd.detection.evaluate import OrtDetector, TorchDetector, evaluate_detector, score_detections
from edgekd.detection.metrics import Detections, postprocess
from edgekd.detection.synthetic import load_synthetic
from edgekd.errors import ExportError
from edgekd.export.detection import DETECTION_OUTPUTS, check_detection_parity, export_detector
from edgekd.models.detr import DETR
from edgekd.profile import detection_post
from edgekd.quantize.calibration import CalibrationSet
from edgekd.quantize.detr_rules import float_nodes, quantize_detr_ort
from tests.test_openvino import needs_openvino

SIZE = 64


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("scenes")
    return load_synthetic(root, seed=3, image_size=SIZE, train=12, val=6, scene_size=SIZE)


@pytest.fixture(scope="module")
def model(scenes) -> DETR:
    torch.manual_seed(0)
    train, _ = scenes
    detr = DETR(
        len(train.classes),
        backbone="mobilenetv3_small_100",
        d_model=32,
        heads=4,
        encoder_layers=1,
        decoder_layers=2,
        ffn_dim=64,
        num_queries=8,
    )
    with torch.no_grad():  # confident, varied outputs (a fresh DETR's are all at the 0.01 prior)
        detr.class_head.bias.normal_(0.0, 2.0)
        detr.box_head.layers[-1].weight.normal_(0.0, 0.1)
    return detr.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("export") / "student.onnx"
    info = export_detector(model, (3, SIZE, SIZE), path)
    return path, info


def test_export_has_named_dynamic_outputs_and_parity_on_both(model, exported, scenes) -> None:
    path, info = exported
    assert info["task"] == "detection"
    assert [o["name"] for o in info["outputs"]] == list(DETECTION_OUTPUTS)
    assert all(o["shape"][0] == "batch" for o in info["outputs"])
    assert info["outputs"][0]["shape"][1:] == [8, 13] and info["outputs"][1]["shape"][1:] == [8, 4]
    _, val = scenes
    parity = check_detection_parity(model, path, val.images, 1e-4)
    assert parity["passed"] and parity["samples"] == len(val) and parity["batch_sizes"] == [len(val), 1]
    assert set(parity["outputs"]) == {"logits", "boxes"}
    assert parity["outputs"]["boxes"]["max_abs_diff"] < 1e-4 and parity["class_agreement"] == 1.0
    with pytest.raises(ExportError, match="tolerance"):
        check_detection_parity(model, path, val.images, 1e-12)


def _output_quantized(model: onnx.ModelProto, op_type: str) -> list[bool]:
    """Per ``op_type`` node: whether its output goes through QuantizeLinear (is computed for INT8)."""
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    return [
        "QuantizeLinear" in consumers.get(node.output[0], [])
        for node in model.graph.node
        if node.op_type == op_type
    ]


def _input_dequantized(model: onnx.ModelProto, op_type: str) -> list[bool]:
    """Per ``op_type`` node: whether its first input comes out of DequantizeLinear (was INT8)."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    return [
        producers.get(node.input[0]) == "DequantizeLinear"
        for node in model.graph.node
        if node.op_type == op_type
    ]


def test_rule_set_keeps_softmax_layernorm_and_heads_float_naive_does_not(exported, scenes, tmp_path) -> None:
    path, _ = exported
    groups = float_nodes(path)
    ops = {node.name: node.op_type for node in onnx.load(str(path)).graph.node}
    # encoder self-attention, decoder self- and cross-attention: each Softmax with its weights x values MatMul
    assert sorted(ops[name] for name in groups["softmax"]) == ["MatMul"] * 5 + ["Softmax"] * 5
    norms = [name for name in groups["layernorm"] if ops[name] == "LayerNormalization"]
    assert len(norms) == 2 * 1 + 3 * 2 + 2  # the layers' norms, the decoder norm after each decoder layer
    assert {ops[name] for name in groups["layernorm"]} == {"LayerNormalization", "Add"}
    proto = onnx.load(str(path))
    producers = {out: node.name for node in proto.graph.node for out in node.output}
    assert producers["logits"] in groups["heads"] and producers["boxes"] in groups["heads"]
    train, _ = scenes
    calib = CalibrationSet(train.images, "fp", "letterbox", requested=len(train), min_samples=4)
    rules = quantize_detr_ort(path, tmp_path / "rules.onnx", calib)
    naive = quantize_detr_ort(path, tmp_path / "naive.onnx", calib, groups=())
    assert rules["rules"] == "detr" and naive["rules"] == "naive" and naive["float_groups"] == {}
    assert rules["float_groups"]["softmax"] == 10
    with_rules, without = onnx.load(str(tmp_path / "rules.onnx")), onnx.load(str(tmp_path / "naive.onnx"))
    assert not any(_output_quantized(with_rules, "Softmax"))
    assert all(_output_quantized(without, "Softmax"))
    # a LayerNorm after a residual Add reads it in float (a decoder norm reading a norm's output may not)
    fp32_producers = {out: node.op_type for node in proto.graph.node for out in node.output}
    after_add = [
        fp32_producers.get(n.input[0]) == "Add" for n in proto.graph.node if n.op_type == "LayerNormalization"
    ]
    assert sum(after_add) == 2 * 1 + 3 * 2
    rules_dq = _input_dequantized(with_rules, "LayerNormalization")
    assert not any(dq for dq, add in zip(rules_dq, after_add, strict=True) if add)
    assert all(_input_dequantized(without, "LayerNormalization"))
    # the heads' output nodes stay float with the rules: nothing between them and the graph outputs
    rule_producers = {out: node for node in with_rules.graph.node for out in node.output}
    assert rule_producers["boxes"].op_type == "Sigmoid" and rule_producers["logits"].op_type == "Add"
    assert rules["nodes_quantized"] < naive["nodes_quantized"]


def test_artifact_evaluation_gives_finite_map_and_agreement(model, exported, scenes) -> None:
    path, _ = exported
    _, val = scenes
    record, reference = evaluate_detector(TorchDetector(model), val)
    assert (
        0.0 <= record["map"] <= 1.0 and 0.0 <= record["map50"] <= 1.0 and record["accuracy"] == record["map"]
    )
    assert record["n"] == len(val) and record["objects"] == val.objects and record["agreement"] is None
    onnx_record, found = evaluate_detector(OrtDetector(path), val, reference)
    assert onnx_record["map"] == pytest.approx(record["map"], abs=1e-3)
    assert all(len(d) == min(100, 8 * 13) for d in found)
    # agreement: the reference's confident detections as ground truth; reproducing them scores 1.0
    confident = [Detections(d.boxes[:2], np.ones(2), d.labels[:2]) for d in reference]
    assert score_detections(val, confident, confident)["agreement"] == pytest.approx(1.0)
    assert all(v is None or math.isfinite(v) for c in record["per_class"].values() for v in c.values())


def test_manifest_postprocessing_record_and_eval_arrays(scenes) -> None:
    from edgekd.bundle.build import detection_eval_arrays, postprocessing_record

    record = postprocessing_record()
    assert record["task"] == "detection" and record["top_k"] == 100 and record["score_threshold"] == 0.0
    assert record["activation"] == "sigmoid" and record["box_format"] == "cxcywh" and record["nms"] is None
    assert record["letterbox"]["placement"] == "centre"
    _, val = scenes
    arrays = detection_eval_arrays(val, 4)
    assert arrays["x"].shape == (4, 3, SIZE, SIZE) and arrays["letterbox"].shape == (4, 6)
    boxes, labels = detection_post.ground_truth(arrays)
    for i in range(4):
        np.testing.assert_array_equal(boxes[i], val.boxes[i])
        np.testing.assert_array_equal(labels[i], val.labels[i])


def test_device_runner_postprocessing_equals_metrics_postprocess(model, exported, scenes) -> None:
    path, _ = exported
    _, val = scenes
    record = {**detection_post.spec(), "top_k": 5, "score_threshold": 0.2}
    runner = detection_post.OutputsRunner(str(path), "onnxruntime", threads=1)
    device = detection_post.detect(runner, val.images, record, batch_size=4)
    with torch.inference_mode():
        logits, boxes = model.for_export()(torch.from_numpy(val.images.copy()))
    host = postprocess(logits, boxes, top_k=5, score_threshold=0.2)
    assert len(device) == len(host) == len(val)
    for (d_boxes, d_scores, d_labels), h in zip(device, host, strict=True):
        np.testing.assert_array_equal(d_labels, h.labels)
        np.testing.assert_allclose(d_scores, h.scores, atol=1e-5)
        np.testing.assert_allclose(d_boxes, h.boxes, atol=1e-5)
        assert np.all(d_scores >= 0.2) and len(d_scores) <= 5
    unpacked = detection_post.unpack(detection_post.pack(device))
    for a, b in zip(unpacked, device, strict=True):
        np.testing.assert_array_equal(a[2], b[2])
        np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    scored = detection_post.score(detection_post_arrays(val), device, val.classes)
    assert scored is not None and scored["n"] == len(val) and 0.0 <= scored["map"] <= 1.0


def detection_post_arrays(val) -> dict[str, np.ndarray]:
    from edgekd.bundle.build import detection_eval_arrays

    return detection_eval_arrays(val, None)


def test_deployment_budget_is_on_the_map_drop() -> None:
    common = {"role": "student", "runtime": "onnxruntime"}
    rows = [
        {**common, "name": "fp32", "precision": "fp32", "artifact": "a.onnx",
         "accuracy": {"accuracy": 0.40}, "latency": {"p50_ms": 10.0}},
        {**common, "name": "int8", "precision": "int8", "artifact": "b.onnx",
         "accuracy": {"accuracy": 0.30}, "latency": {"p50_ms": 5.0}},
    ]  # fmt: skip
    artifacts = [
        {"path": "a.onnx", "backend": "onnxruntime", "precision": "fp32"},
        {"path": "b.onnx", "backend": "onnxruntime", "precision": "int8"},
    ]
    decision = decide(rows, artifacts, max_drop=0.02, metric="mAP")
    assert decision["precision"] == "fp32" and decision["metric"] == "mAP"
    assert "drops 0.1000 mAP" in decision["reason"]
    assert "metric" not in decide(rows, artifacts, max_drop=0.2)


@needs_openvino
def test_openvino_int8_of_the_shipped_teacher_keeps_its_map(tmp_path) -> None:
    """What a detection run compiles for OpenVINO (the DETR-rules QDQ model, converted) keeps a trained
    DETR's mAP: NNCF's own INT8 lost nearly all of it (detr_rules.NNCF_MEASURED)."""
    import openvino as ov

    from edgekd import teachers
    from edgekd.backends.openvino import _save_ir
    from edgekd.detection.evaluate import OpenVinoDetector
    from edgekd.models import build_model
    from edgekd.models.checkpoint import load_weights

    train, held_out = load_synthetic(tmp_path / "scenes", seed=7, image_size=128, train=32, val=64)
    teacher = build_model("edgekd:detr-r18", len(train.classes), 3, kwargs={"task": "detection"})
    load_weights(teacher, teachers.weights("detr-r18-scenes"), "edgekd:detr-r18")
    fp32, qdq = tmp_path / "teacher.onnx", tmp_path / "teacher.int8.onnx"
    export_detector(teacher.eval(), (3, 128, 128), fp32)
    quantize_detr_ort(fp32, qdq, CalibrationSet(train.images, "scenes", "none", 32, 16))
    _save_ir(ov.convert_model(str(qdq)), tmp_path / "teacher.int8.xml", compress_to_fp16=False)
    float_map50 = evaluate_detector(OrtDetector(fp32, 2), held_out)[0]["map50"]
    int8_map50 = evaluate_detector(OpenVinoDetector(tmp_path / "teacher.int8.xml", 2), held_out)[0]["map50"]
    assert float_map50 > 0.08 and int8_map50 >= float_map50 - 0.03, (float_map50, int8_map50)
