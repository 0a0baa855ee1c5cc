"""DETR models (edgekd.models.detr) and the set criterion (edgekd.detection): shapes, matching, GIoU,
focal loss, overfitting, registry guard, ONNX export and parity under ONNX Runtime."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekd.detection.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from edgekd.detection.criterion import HungarianMatcher, SetCriterion, sigmoid_focal_loss
from edgekd.errors import ModelError
from edgekd.models import MODELS, build_model
from edgekd.models.detr import DETR, SIZES

SIZE = 64  # tiny images: a 2x2 stride-32 map

# What the exported student may contain: standard operators ONNX Runtime and OpenVINO run and know how
# to quantise or leave in float; attention is MatMul/Softmax, normalisation LayerNormalization.
ALLOWED_OPS = {
    "Conv", "Relu", "HardSwish", "HardSigmoid", "ReduceMean", "GlobalAveragePool", "MaxPool",
    "BatchNormalization", "MatMul", "Gemm", "Softmax", "LayerNormalization", "Add", "Sub", "Mul", "Div",
    "Sigmoid", "Log", "Clip", "Sin", "Cos", "Reshape", "Transpose", "Concat", "Slice", "Unsqueeze",
    "Squeeze", "Expand", "Shape", "Gather", "Flatten", "Constant", "Identity",
    "ReduceMax", "TopK", "GatherElements",  # query selection: the tokens of highest class score
}  # fmt: skip


def _detr(name: str, num_classes: int = 5, seed: int = 0) -> DETR:
    torch.manual_seed(seed)
    return build_model(name, num_classes, 3, kwargs={"task": "detection"})


def _target(labels: list[int], boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }


@pytest.mark.parametrize("name", sorted(SIZES))
def test_outputs_shapes_and_boxes_in_unit_square(name: str) -> None:
    model = _detr(name)
    size = SIZES[name]
    out = model(torch.randn(2, 3, SIZE, SIZE))
    tokens = (SIZE // size["feature_stride"]) ** 2
    queries, d_model = (
        min(size["num_queries"], tokens),
        size["d_model"],
    )  # query selection: at most a token each
    assert out["logits"].shape == (2, queries, 5)
    assert out["boxes"].shape == (2, queries, 4)
    assert out["memory"].shape == (2, tokens, d_model)
    assert len(out["aux"]) == size["decoder_layers"]  # the earlier decoder layers and the chosen proposals
    for layer in out["aux"]:
        assert layer["logits"].shape == (2, queries, 5) and layer["boxes"].shape == (2, queries, 4)
    for boxes in [out["boxes"], *(layer["boxes"] for layer in out["aux"])]:
        assert torch.isfinite(boxes).all() and boxes.min() >= 0 and boxes.max() <= 1
    # focal prior: every class starts at probability ~0.01 (class bias, DAB-DETR's initialisation)
    assert out["logits"].sigmoid().mean().item() == pytest.approx(0.01, abs=0.01)
    assert model.task == "detection" and model.input_rank == 3


def test_sizes_teacher_is_larger_than_student() -> None:
    teacher, student = _detr("edgekd:detr-r18"), _detr("edgekd:detr-mnv3")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (len(teacher.encoder), len(teacher.decoder), teacher.d_model) == (3, 3, 128)
    assert (len(student.encoder), len(student.decoder), student.d_model) == (1, 2, 64)
    assert count(teacher) > 3 * count(student)
    assert 0.5e6 < count(student) < 2e6  # mobilenetv3_small_100 backbone + a 64-wide transformer


def test_decode_takes_other_queries_over_the_same_memory() -> None:
    model = _detr("edgekd:detr-mnv3").eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        memory, pos, grid = model.encode(images)
        anchors = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.4, 0.3], [0.5, 0.5, 0.9, 0.9]])
        layers = model.decode(
            memory, pos, anchors.expand(2, -1, -1), content=torch.randn(2, 3, model.d_model)
        )
        assert [out["logits"].shape for out in layers] == [(2, 3, 5)] * 2
        assert layers[-1]["hidden"].shape == (2, 3, model.d_model)
        # the model's own queries are its chosen proposals: forward == encode + decode from them
        chosen = model.proposals(memory, grid)
        full, last = model(images), model.decode(memory, pos, chosen["anchors"], chosen["content"])[-1]
        assert torch.allclose(full["boxes"], last["boxes"]) and torch.allclose(full["memory"], memory)
        with pytest.raises(ValueError, match="decodes given anchors"):
            model.decode(memory, pos)
        # with a zero box delta (the head's initialisation) the first layer returns its anchors
        assert torch.allclose(layers[0]["boxes"], anchors.expand(2, -1, -1), atol=1e-5)


def test_query_selection_starts_the_decoder_at_the_top_proposals() -> None:
    torch.manual_seed(0)
    sizes = {"d_model": 32, "heads": 4, "encoder_layers": 1, "decoder_layers": 2, "ffn_dim": 64}
    model = DETR(
        5, backbone="mobilenetv3_small_100", num_queries=10, feature_stride=16, query_selection=True, **sizes
    )
    model.eval()
    assert model.stride == 16
    images = torch.randn(2, 3, SIZE, SIZE)  # a 4x4 map: 16 tokens, 10 chosen
    with torch.no_grad():
        memory, pos, grid = model.encode(images)
        chosen = model.proposals(memory, grid)
        out = model(images)
    assert grid == (4, 4) and chosen["logits"].shape == (2, 10, 5) and chosen["anchors"].shape == (2, 10, 4)
    dense = out["dense"]
    assert dense["logits"].shape == (2, 16, 5) and dense["boxes"].shape == (2, 16, 4)
    # the chosen tokens are the 10 of highest class score, in order
    best = dense["logits"].amax(-1).topk(10, dim=1).indices
    assert torch.equal(chosen["boxes"], dense["boxes"].gather(1, best.unsqueeze(-1).expand(-1, -1, 4)))
    # with a zero box delta (the heads' initialisation) each token's proposal is its cell: centre and a
    # side of 0.05 * stride / 8 (Deformable DETR's two-stage proposals)
    centres = (torch.arange(4) + 0.5) / 4
    assert torch.allclose(dense["boxes"][0, :4, 0], centres) and torch.allclose(
        dense["boxes"][0, ::4, 1], centres
    )
    assert torch.allclose(dense["boxes"][..., 2:], torch.full((2, 16, 2), 0.1))
    # the decoder starts at the chosen proposals: its first layer (zero delta) returns them
    assert torch.allclose(out["aux"][0]["boxes"], chosen["anchors"], atol=1e-5)
    assert out["aux"][-1]["logits"].shape == (2, 10, 5)  # the proposals' set loss (RT-DETR's encoder loss)
    # the kd-detr baseline's "specific" queries are the same anchors
    assert torch.equal(model.query_anchors(memory, grid), chosen["anchors"])


def test_feature_stride_must_be_one_of_the_backbone_stages() -> None:
    with pytest.raises(
        ModelError, match=r"no stage of stride 12; feature_stride is one of \[2, 4, 8, 16, 32\]"
    ):
        DETR(5, backbone="resnet18", feature_stride=12)


def test_dense_loss_assigns_centre_cells_one_to_many() -> None:
    criterion = SetCriterion(5)
    rows = cols = 4
    centres = (torch.arange(4) + 0.5) / 4
    grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
    anchors = torch.cat(
        (torch.stack((grid_x, grid_y), -1).reshape(1, 16, 2), torch.full((1, 16, 2), 0.1)), -1
    )
    big, tiny = [0.5, 0.5, 0.6, 0.6], [0.1, 0.1, 0.05, 0.05]
    targets = [_target([1, 3], [big, tiny])]
    # a large object owns the four cells whose centres fall inside it near its centre; an object smaller
    # than a cell keeps the one cell holding its centre
    expected = {5: (1, big), 6: (1, big), 9: (1, big), 10: (1, big), 0: (3, tiny)}
    boxes = torch.rand(1, 16, 4) * 0.2 + 0.4
    onehot = torch.zeros(1, 16, 5)
    for token, (label, box) in expected.items():
        boxes[0, token] = torch.tensor(box)
        onehot[0, token, label] = 1.0
    logits = torch.randn(1, 16, 5)
    dense = {"logits": logits, "boxes": boxes, "anchors": anchors, "grid": (rows, cols)}
    losses = criterion.dense_losses(dense, targets)
    assert losses["bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["giou"].item() == pytest.approx(0.0, abs=1e-4)
    assert losses["class"].item() == pytest.approx(sigmoid_focal_loss(logits, onehot, 5).item(), rel=1e-6)
    # a smaller object over the same cells takes them (FCOS: the smallest box wins)
    inner = [0.5, 0.5, 0.3, 0.3]
    boxes[0, [5, 6, 9, 10]] = torch.tensor(inner)
    onehot[0, [5, 6, 9, 10]] = 0.0
    onehot[0, [5, 6, 9, 10], 2] = 1.0
    losses = criterion.dense_losses(dense, [_target([1, 3, 2], [big, tiny, inner])])
    assert losses["bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["class"].item() == pytest.approx(sigmoid_focal_loss(logits, onehot, 5).item(), rel=1e-6)
    # and an image without objects has only negatives
    empty = criterion.dense_losses(dense, [_target([], [])])
    assert empty["class"].item() == pytest.approx(
        sigmoid_focal_loss(logits, torch.zeros_like(logits), 1).item()
    )


def test_dense_loss_weight_adds_the_weighted_dense_terms() -> None:
    model = _detr("edgekd:detr-mnv3")
    assert model.dense_loss_weight == 1.0  # the registered sizes' choice (ours; the class default is 0)
    out = model(torch.randn(1, 3, SIZE, SIZE))
    targets = [_target([1, 3], [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])]
    criterion = SetCriterion(5)
    dense = criterion.dense_losses(out["dense"], targets)
    with_term = criterion(out, targets)["loss"]
    out["dense"]["weight"] = 0.0
    without = criterion(out, targets)["loss"]
    expected = dense["class"] + 5 * dense["bbox"] + 2 * dense["giou"]
    assert (with_term - without).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ModelError, match="set query_selection too"):
        DETR(5, backbone="mobilenetv3_small_100", dense_loss_weight=1.0)


def test_registry_guard_keeps_detection_models_out_of_classification() -> None:
    for name in SIZES:
        assert MODELS.get(name).task == "detection"
        with pytest.raises(ModelError, match=r"is a detection model .* choose a classification model"):
            build_model(name, 5, 3)  # what a classification run asks for
    with pytest.raises(ModelError, match=r"does not take \['depth'\]"):
        build_model("edgekd:detr-mnv3", 5, 3, kwargs={"task": "detection", "depth": 3})
    model = build_model("edgekd:detr-mnv3", 4, 3, kwargs={"task": "detection", "num_queries": 7})
    assert model(torch.randn(1, 3, SIZE, SIZE))["logits"].shape == (1, 7, 4)


# -------------------------------------------------------------------------------------------- boxes


def test_giou_known_values() -> None:
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou(a, b)
    # identical: 1; disjoint side by side: IoU 0, hull 3, union 2 -> -1/3; half overlap: 1/3 - 0
    assert giou[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert giou[0, 1].item() == pytest.approx(-1 / 3, abs=1e-6)
    assert giou[1, 2].item() == pytest.approx(1 / 3, abs=1e-6)
    # [0,0,1,1] vs [1,0,3,1]: touching, IoU 0, hull 3, union 3 -> 0
    assert giou[0, 2].item() == pytest.approx(0.0, abs=1e-6)
    iou, union = box_iou(a, b)
    assert iou[1, 2].item() == pytest.approx(1 / 3, abs=1e-6) and union[1, 2].item() == pytest.approx(3.0)
    far = generalized_box_iou(
        torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[99.0, 99.0, 100.0, 100.0]])
    )
    assert far.item() == pytest.approx(-1.0, abs=1e-3)  # GIoU -> -1 as boxes move apart
    boxes = torch.rand(10, 4) * 0.5 + 0.1
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes)), boxes, atol=1e-6)
    assert cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])).tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7])


def test_focal_loss_known_value() -> None:
    # logit 0 -> p = 0.5: positive: 0.25 * (0.5)^2 * ln 2; negative: 0.75 * (0.5)^2 * ln 2
    loss = sigmoid_focal_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), num_boxes=1)
    assert loss.item() == pytest.approx((0.25 + 0.75) * 0.25 * math.log(2), rel=1e-6)
    assert sigmoid_focal_loss(
        torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), num_boxes=2
    ).item() == pytest.approx(0.5 * loss.item())


# ----------------------------------------------------------------------------------------- matching


def test_matching_equals_brute_force() -> None:
    torch.manual_seed(3)
    matcher = HungarianMatcher()
    logits, boxes = torch.randn(1, 5, 4), torch.rand(1, 5, 4) * 0.5 + 0.2
    target = _target([2, 0, 2], [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6]])
    cost = matcher.cost_matrix(logits[0], boxes[0], target)
    # one entry by hand: focal class cost (alpha 0.25, gamma 2) * 2 + L1 * 5 - GIoU * 2
    p = logits[0, 1, 0].sigmoid()
    class_cost = 0.25 * (1 - p) ** 2 * -torch.log(p) - 0.75 * p**2 * -torch.log(1 - p)
    l1 = (boxes[0, 1] - target["boxes"][1]).abs().sum()
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes[0, 1:2]), cxcywh_to_xyxy(target["boxes"][1:2]))[0, 0]
    assert cost[1, 1].item() == pytest.approx((2 * class_cost + 5 * l1 - 2 * giou).item(), abs=1e-5)
    ((rows, cols),) = matcher(logits, boxes, [target])
    assert sorted(cols.tolist()) == [0, 1, 2] and len(set(rows.tolist())) == 3
    found = cost[rows, cols].sum().item()
    best = min(
        sum(cost[q, o].item() for o, q in enumerate(order)) for order in itertools.permutations(range(5), 3)
    )
    assert found == pytest.approx(best, abs=1e-5)


def test_images_without_objects() -> None:
    model = _detr("edgekd:detr-mnv3")
    out = model(torch.randn(2, 3, SIZE, SIZE))
    empty = _target([], [])
    ((rows, cols), _) = HungarianMatcher()(out["logits"], out["boxes"], [empty, empty])
    assert rows.numel() == 0 and cols.numel() == 0
    losses = SetCriterion(5)(out, [empty, empty])
    assert losses["bbox"].item() == 0 and losses["giou"].item() == 0 and losses["class"].item() > 0
    losses["loss"].backward()  # only "no object" to learn: every class probability pushed down
    assert model.class_head.bias.grad is not None and (model.class_head.bias.grad > 0).all()


def test_set_loss_sums_auxiliary_layers_with_dab_detr_weights() -> None:
    model = _detr("edgekd:detr-r18")
    out = model(torch.randn(1, 3, SIZE, SIZE))
    targets = [_target([1, 3], [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])]
    with_aux, last_only = SetCriterion(5)(out, targets), SetCriterion(5, aux=False)(out, targets)
    weighted = last_only["class"] + 5 * last_only["bbox"] + 2 * last_only["giou"]
    assert last_only["loss"].item() == pytest.approx(weighted.item(), rel=1e-5)
    assert with_aux["loss"].item() > 2 * last_only["loss"].item()  # 3 decoder layers, each a full loss
    assert SetCriterion(5).matcher == HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)


def test_loss_decreases_when_overfitting_two_images() -> None:
    torch.manual_seed(0)
    model = _detr("edgekd:detr-mnv3", num_classes=3)
    images = torch.zeros(2, 3, SIZE, SIZE)
    images[0, 0, 8:24, 10:30] = 1
    images[0, 1, 36:60, 30:50] = 1
    images[1, 2, 20:44, 20:44] = 1

    def box(x0: int, y0: int, x1: int, y1: int) -> list[float]:
        return [(x0 + x1) / (2 * SIZE), (y0 + y1) / (2 * SIZE), (x1 - x0) / SIZE, (y1 - y0) / SIZE]

    targets = [
        _target([0, 1], [box(10, 8, 30, 24), box(30, 36, 50, 60)]),
        _target([2], [box(20, 20, 44, 44)]),
    ]
    criterion = SetCriterion(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(30):
        losses = criterion(model(images), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # DAB-DETR's clip_max_norm
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()})
    assert all(math.isfinite(step["loss"]) for step in history)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["bbox"] < history[0]["bbox"] and history[-1]["giou"] < history[0]["giou"]


# ------------------------------------------------------------------------------------------- export


def test_onnx_export_parity_and_standard_ops(tmp_path: Path) -> None:
    model = _detr("edgekd:detr-mnv3").eval()
    export = model.for_export()
    path = tmp_path / "detr.onnx"
    program = torch.onnx.export(
        export,
        (torch.randn(2, 3, SIZE, SIZE),),
        None,
        input_names=["images"],
        output_names=["logits", "boxes"],
        opset_version=18,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [output.name for output in proto.graph.output] == ["logits", "boxes"]
    ops = {node.op_type for node in proto.graph.node}
    assert {"MatMul", "Softmax", "LayerNormalization"} <= ops
    assert ops <= ALLOWED_OPS, f"unexpected ops: {sorted(ops - ALLOWED_OPS)}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # dynamic batch
        images = torch.randn(batch, 3, SIZE, SIZE)
        logits, boxes = session.run(["logits", "boxes"], {"images": images.numpy()})
        with torch.no_grad():
            expected_logits, expected_boxes = export(images)
        assert logits.shape == (batch, 16, 5) and boxes.shape == (batch, 16, 4)  # 16 tokens, all chosen
        assert np.abs(logits - expected_logits.numpy()).max() < 1e-4
        assert np.abs(boxes - expected_boxes.numpy()).max() < 1e-4
    # ONNX Runtime's static QDQ quantiser takes the graph as it is: MatMuls and Convs get Q/DQ pairs
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": torch.randn(1, 3, SIZE, SIZE).numpy()} for _ in range(2)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantized = tmp_path / "detr-int8.onnx"
    quantize_static(str(path), str(quantized), Reader(), quant_format=QuantFormat.QDQ)
    nodes = onnx.load(str(quantized)).graph.node
    dequantized = {name for node in nodes if node.op_type == "DequantizeLinear" for name in node.output}
    consumers = {node.op_type for node in nodes if dequantized & set(node.input)}
    assert {"MatMul", "Conv"} <= consumers
    session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    logits, boxes = session.run(["logits", "boxes"], {"images": images.numpy()})
    assert np.isfinite(logits).all() and boxes.min() >= 0 and boxes.max() <= 1
