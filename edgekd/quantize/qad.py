"""Quantisation-aware distillation (QAD): the fake-quantised student fine-tuned against the teacher.

QAT (Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018) trains through simulated INT8 with the straight-through estimator (Bengio et
al., 2013); QAD replaces its label loss by distillation from the FP32 teacher (Mishra & Marr,
"Apprentice", ICLR 2018; NVIDIA ModelOpt's QAD recipe). Decisions, each measured or argued:

- **Starting point = PTQ.** BatchNorm is folded into the preceding Conv/Linear (eval statistics), then
  every Conv1d/Conv2d/Linear gets fake quantisers: its activation input symmetric INT8 per tensor
  (zero point 0, range from the *same* calibration frames and the same min/max rule as the PTQ rung)
  and its weight symmetric INT8 per output channel (zero point 0; per tensor with
  ``quantize.per_channel: false``). That is TensorRT's explicit-quantisation placement (Q/DQ on the
  inputs of weighted layers, biases in float), which OpenVINO also runs. Step 0 of QAD is therefore
  a PTQ model, and its accuracy is recorded beside the fine-tuned one.
- **Layout per backend** (:func:`qdq_layout`). ONNX Runtime's CPU fuses DequantizeLinear → Conv →
  QuantizeLinear into QLinearConv/QGemm; TensorRT's layout has no Q after a conv, so ORT ran the convs
  in float between Q/DQ pairs (MobileNetV3 on digits: 5.6x the PTQ INT8 p50, radio 1.9x). ONNX
  Runtime targets therefore train and export ORT's own layout: activations asymmetric UINT8 with
  ORT's min/max rule (range widened to hold 0) on the input *and the output* of every Conv/Linear,
  weights as above, and (:func:`attach_activation_quantisers`, torch.fx) the same quantisers on the
  inputs and output of every Add/Mul of two tensors and every Sigmoid (SiLU and Hardswish written as
  ``x * sigmoid(x)`` and ``x * hardsigmoid(x)``), the element-wise ops ORT's PTQ quantises and its
  CPU runs as QLinearAdd / QLinearMul / QLinearSigmoid. Conv/Linear alone left EfficientNet-B0's
  SiLUs and residual Adds in float between DQ/Q pairs (125 DequantizeLinear in ORT's optimised graph,
  PTQ's 18; 1.22x PTQ's p50); with them the optimised graph is PTQ's, op for op (a model torch.fx
  cannot trace keeps Conv/Linear only, and the record says why). Its export is the fake-quant model
  itself, so the parity gate holds and the artifact runs at PTQ's latency
  (benchmarks/results/qad_latency.json).
  Measured and rejected: fine-tuning in TensorRT's layout and re-quantising the fine-tuned float
  network with ORT's PTQ (as fast, but only 77-87 % top-1 agreement with the fake-quant model: a
  different quantisation of a model with small margins), and signed INT8 activations (ORT's s8s8
  path was 4.5x slower). TensorRT and OpenVINO targets keep TensorRT's layout.
- **Loss.** The loss of ``distill.method`` when it is a logit method (kd, dkd, skd, ... : teacher
  logits only, from the teacher cache when one exists), otherwise Hinton KD; plus CE on the labels
  (added once, on top of any label term the method has, to anchor the quantised argmax).
- **Ranges: activation ranges calibrated and frozen by default; learned (LSQ) on request; weight
  ranges follow the weights.** With ``quantize.qad_learn_ranges: true`` each activation scale (and,
  in ORT's layout, zero point) starts at its calibrated value and is trained with the weights (Esser
  et al., "Learned Step Size Quantization", ICLR 2020; the learned offset of Bhalgat et al., "LSQ+",
  CVPR-W 2020) through ``torch._fake_quantize_learnable_per_tensor_affine`` (STE for the input, LSQ's
  gradient for the scale) at ``quantize.qad_range_lr`` (default 10x the QAD lr; 100x diverged).
  :meth:`FakeQuantLayer.freeze` copies the learned values into the constant buffers the core op
  reads, so the learnable op never reaches the exporter and the export and the parity gate are as
  with frozen ranges (so "the exporter does not map a learnable op" is no reason to freeze them).
  The runtime adds one constraint: where a conv feeds a conv directly, ORT's layout has Q -> DQ ->
  Q -> DQ on one tensor and ONNX Runtime merges a DQ -> Q pair of unequal ranges into a third range,
  so chained quantisers share one learned range (:func:`tie_learned_ranges`; untied, EfficientNet-B0
  and MobileNetV3 fell to 96 % parity agreement and back to TensorRT's slow layout). Why not the
  default: measured (ONNX artifact, held-out top-1 drop in points, seeds 0/1/2, 10 epochs each),
  learned ranges lost to frozen ones on the case QAD was tuned for (EfficientNet-B0, digits, ORT:
  1.34/1.11/0.67 vs 0.00/0.45/0.89) and won on MobileNetV3 per-tensor (-0.67/0.22/0.22 vs
  1.11/0.22/-0.45): no rule that holds across students, so the simpler one stays. No single layer
  dominates the error left after QAD (EfficientNet-B0: bypassing any one of the 81 quantised layers
  cuts the logit MSE by <= 3 %), so keeping layers float is no lever either. Weight scales are
  recomputed from each step's weights (max |w| / 127 per channel) and frozen for export, so no
  weight is ever clipped.
- **Length: 10 epochs** (``quantize.qad_epochs``; cosine decay from ``quantize.qad_lr``, default
  distill lr / 30). On digits an epoch is 9 AdamW steps: 3 epochs barely moved the PTQ start
  (EfficientNet-B0 drop 0.67/2.23/0.67 points), 10 epochs gave 0.00/0.45/0.89 (MobileNetV3
  per-tensor 1.56/1.11/-0.67 -> 1.11/0.22/-0.45). Distilling from the FP32 student itself instead
  of the teacher was worse (seed 1, fake-quant top-1: 0.935 vs 0.947), and so was fine-tuning on 10
  augmented views per frame (the image bank, teacher run on each view, the same number of steps:
  ONNX drops 0.22/1.11/1.56 points against -0.22/1.34/1.11 on the same three students, one run by
  hand). What is left is near the runtime's own floor: ORT's fused QLinearConv kernels flip
  0.2-0.9 % of the held-out predictions of the fake-quant model (rounding ties propagating; the
  parity gate's 99 %), i.e. 1-4 of 449 images.
- **Biases on the INT32 grid** (scale = input scale x weight scale, with STE), stored so at export:
  ONNX Runtime's WeightBiasQuantization rewrites a float bias behind DequantizeLinear inputs to INT32
  when it optimises the graph; with an off-grid bias that moved the logits of a MobileNetV3 by ~2
  quantisation steps and failed the parity gate, on the grid the optimised and the unoptimised
  session compute the same numbers (TensorRT keeps the bias in float: the same values).
- **Implementation: core ``torch.fake_quantize_per_{tensor,channel}_affine`` ops with STE**, exported
  by the TorchScript ONNX exporter, which maps each one to a QuantizeLinear/DequantizeLinear pair with
  constant INT8 zero points: the exported model is bit-for-bit the trained one up to float summation
  order. torchao's PT2E QAT (torchao 0.18.0 is on PyPI for torch 2.14) needs a ``torch.export``
  capture of the student and a second (dynamo) ONNX export of the converted graph; the core ops
  give the same QDQ graph with fewer moving parts.
- **Parity gates** (:func:`parity_gate`): the ONNX artifact (ONNX Runtime) vs the fake-quant PyTorch
  model on held-out frames: top-1 agreement >= 99 % and the 99th percentile of |logit difference|
  within one quantisation step of the logits (max |logit| / 127) or, when larger, the model's own
  quantisation noise (deep networks: rounding-tie flips propagate); a failure is a QuantizeError,
  except in ORT's layout, where QAD runs again in TensorRT's layout and ``layout_fallback`` says why.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgekd.atomic import atomic_path
from edgekd.errors import QuantizeError, first_line

QMIN, QMAX = -128, 127
UQMAX = 255
MIN_SCALE = 1e-8
INT32_MIN, INT32_MAX = -(2**31) + 1, 2**31 - 1
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
MIN_AGREEMENT = 0.99
EVAL_BATCH = 256
QAD_EXPORT_OPSET = 18
LAYOUTS = ("tensorrt", "onnxruntime")
TENSORRT_ACTIVATIONS = "TensorRT's layout: Q/DQ on the weighted layers' inputs only (TensorRT fuses the rest)"


class TensorQuantisers(nn.Module):
    """Per-tensor activation fake quantisers of one module, by kind: ``act`` (a layer's input) and ``out``
    (an output). Each kind has min/max buffers (calibration), a frozen scale and zero point (what the
    export holds) and, while ranges are learned, parameters ``{kind}_scale_range`` / ``{kind}_zero_range``.

    ``asymmetric=False`` is TensorRT's rule (symmetric INT8, max |x| / 127, zero point 0);
    ``asymmetric=True`` is ONNX Runtime's (UINT8, the range widened to hold 0, the zero point rounded).
    """

    def __init__(self, kinds: tuple[str, ...], asymmetric: bool) -> None:
        super().__init__()
        self.kinds = kinds
        self.asymmetric = asymmetric
        self.observing = False
        self.bypass = False  # True: the float network (the parity gate's quantisation-noise reference)
        self.frozen = False
        self.learned: nn.ParameterDict | None = None  # learned activation ranges (LSQ), until freeze()
        for kind in kinds:
            self.register_buffer(f"{kind}_min", torch.zeros(()))
            self.register_buffer(f"{kind}_max", torch.zeros(()))
            self.register_buffer(f"{kind}_scale", torch.ones(()))
            self.register_buffer(f"{kind}_zero", torch.zeros((), dtype=torch.int32))

    @property
    def act_range(self) -> tuple[int, int]:
        return (0, UQMAX) if self.asymmetric else (QMIN, QMAX)

    @property
    def calibrated_kinds(self) -> tuple[str, ...]:
        """The kinds with a quantiser in this layout (TensorRT's has no output quantiser)."""
        return self.kinds if self.asymmetric else self.kinds[:1]

    def reset_observed(self) -> None:
        for kind in self.kinds:
            getattr(self, f"{kind}_min").zero_()
            getattr(self, f"{kind}_max").zero_()

    @torch.no_grad()
    def set_ranges(self) -> None:
        """Scales and zero points from the observed min/max: symmetric max |x| / 127 (TensorRT), or
        ONNX Runtime's asymmetric UINT8 rule (range widened to hold 0, zero point rounded)."""
        for kind in self.calibrated_kinds:
            low, high = getattr(self, f"{kind}_min"), getattr(self, f"{kind}_max")
            scale, zero = getattr(self, f"{kind}_scale"), getattr(self, f"{kind}_zero")
            if not self.asymmetric:
                scale.copy_((torch.maximum(low.abs(), high.abs()) / QMAX).clamp_min(1e-8))
                zero.zero_()
                continue
            lo, hi = low.clamp_max(0.0), high.clamp_min(0.0)
            scale.copy_(((hi - lo) / UQMAX).clamp_min(1e-8))
            zero.copy_(torch.round(-lo / scale).clamp(0, UQMAX).to(torch.int32))

    @torch.no_grad()
    def learn_ranges(self) -> None:
        """Make the calibrated activation scales (and, asymmetric, zero points) trainable (LSQ / LSQ+).

        The learned values live in ``learned`` (float parameters, named ``*_range``) and run through
        ``torch._fake_quantize_learnable_per_tensor_affine`` (Esser et al., "Learned Step Size
        Quantization", ICLR 2020: STE for the input, LSQ's gradient for the scale, scaled by
        1 / sqrt(numel x qmax); Bhalgat et al., "LSQ+", CVPR-W 2020, for the learned offset). The op
        rounds the zero point in its forward pass, so :meth:`freeze` copies the values into the
        constant buffers and the export uses the core op unchanged.
        """
        params = {}
        for kind in self.calibrated_kinds:
            params[f"{kind}_scale_range"] = nn.Parameter(getattr(self, f"{kind}_scale").reshape(1).clone())
            if self.asymmetric:
                params[f"{kind}_zero_range"] = nn.Parameter(getattr(self, f"{kind}_zero").float().reshape(1))
        self.learned = nn.ParameterDict(params)

    def _scale(self, kind: str) -> torch.Tensor:
        if self.learned is None:
            return getattr(self, f"{kind}_scale")
        return self.learned[f"{kind}_scale_range"][0].clamp_min(MIN_SCALE)  # as the forward pass uses it

    @torch.no_grad()
    def _store_learned_ranges(self) -> None:
        if self.learned is None:
            return
        low, high = self.act_range
        for kind in self.calibrated_kinds:
            getattr(self, f"{kind}_scale").copy_(self.learned[f"{kind}_scale_range"][0].clamp_min(MIN_SCALE))
            if self.asymmetric:  # rounded and clamped exactly as the learnable op does in its forward
                zero = torch.round(self.learned[f"{kind}_zero_range"][0].clamp(low, high))
                getattr(self, f"{kind}_zero").copy_(zero.to(torch.int32))
        self.learned = None

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the activation ranges: learned ones are copied into the constants the export holds."""
        self._store_learned_ranges()
        self.frozen = True

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, kind: str) -> None:
        low, high = getattr(self, f"{kind}_min"), getattr(self, f"{kind}_max")
        low.copy_(torch.minimum(low, x.detach().amin()))
        high.copy_(torch.maximum(high, x.detach().amax()))

    def _fake_quant_activation(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        low, high = self.act_range
        if self.learned is None:
            scale = getattr(self, f"{kind}_scale")
            if self.frozen:  # what the export holds
                scale = _constant_scale(scale)
            zero = _constant(getattr(self, f"{kind}_zero"))
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, low, high)
        scale = self.learned[f"{kind}_scale_range"].clamp_min(MIN_SCALE)  # what freeze() stores
        zero = self.learned[f"{kind}_zero_range"] if self.asymmetric else torch.zeros(1)
        grad_factor = 1.0 / math.sqrt(max(1, x[0].numel()) * high)  # LSQ's step-size gradient scale
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero, low, high, grad_factor)


class FakeQuantLayer(TensorQuantisers):
    """A Conv1d/Conv2d/Linear with INT8 fake quantisation of its input and weight (and, in ONNX Runtime's
    layout, its output).

    Layouts: ``asymmetric=False`` is TensorRT's (input symmetric INT8, zero point 0); ``asymmetric=True``
    is ONNX Runtime's own (input *and output* asymmetric UINT8, ranges widened to hold 0 as ORT's
    quantiser does), so the exported graph is DequantizeLinear → Conv → QuantizeLinear, which ORT's
    CPU fuses into QLinearConv/QGemm. ``act_scale``/``out_scale``: per-tensor scales (calibrated, then
    frozen). Weight scales are max |w| / 127 per output channel (or per tensor), recomputed every
    forward pass until :meth:`freeze` stores them. The forward pass uses the straight-through
    estimator of ``torch.fake_quantize_*`` (gradients pass where the value is inside the INT8 range).
    """

    def __init__(self, layer: nn.Module, per_channel: bool, asymmetric: bool = False) -> None:
        super().__init__(("act", "out"), asymmetric)
        self.layer = layer
        self.per_channel = per_channel
        channels = layer.weight.shape[0] if per_channel else 1
        self.register_buffer("weight_scale", torch.ones(channels))
        # ONNX Runtime's layout, output read only by a ReLU: the output range is the ReLU's ([0, max], zero
        # point 0), as ORT's PTQ quantises a Conv -> Relu pair (:func:`_fold_relus`)
        self.relu_follows = False

    def _current_weight_scale(self) -> torch.Tensor:
        weight = self.layer.weight.detach()
        amax = weight.abs().flatten(1).amax(dim=1) if self.per_channel else weight.abs().amax().reshape(1)
        return (amax / QMAX).clamp_min(1e-12)

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the activation ranges (learned ones copied into constants) and the weight scales to the
        current weights' (what the exported Q/DQ nodes hold), and store the bias on its INT32 grid (so
        the export holds it as one float constant)."""
        self._store_learned_ranges()
        self.weight_scale.copy_(self._current_weight_scale())
        bias = self.quantized_bias()
        if bias is not None:
            self.layer.bias.copy_(bias)
        super().freeze()

    def quantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale if self.frozen else self._current_weight_scale()
        return self._fake_quant_weight(scale)

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias on the INT32 grid of scale ``act_scale * weight_scale`` (per channel), with STE.

        Integer runtimes add the bias to the INT32 accumulator (ONNX Runtime's WeightBiasQuantization
        rewrites a float bias so), so training on the grid keeps the exported model's runtime numerics
        identical; TensorRT keeps biases in float and reads the same (grid-valued) numbers.
        """
        bias = self.layer.bias
        if bias is None or self.frozen:
            return bias
        scale = (self._scale("act").detach() * self._current_weight_scale()).expand(bias.shape)
        steps = torch.clamp(torch.round(bias.detach() / scale), INT32_MIN, INT32_MAX)
        return bias + (steps * scale - bias).detach()

    def _fake_quant_weight(self, scale: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            scale = _constant_scale(scale)
        if self.per_channel:
            zero = torch.zeros(scale.shape, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(self.layer.weight, scale, zero, 0, QMIN, QMAX)
        return torch.fake_quantize_per_tensor_affine(
            self.layer.weight, scale[0], torch.zeros((), dtype=torch.int32), QMIN, QMAX
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.layer(x)
        if self.observing:
            self._observe(x, "act")
            out = self.layer(x)
            self._observe(F.relu(out) if self.relu_follows else out, "out")
            return out
        x = self._fake_quant_activation(x, "act")
        weight, bias = self.quantized_weight(), self.quantized_bias()
        if isinstance(self.layer, nn.Linear):
            out = F.linear(x, weight, bias)
        else:
            out = self.layer._conv_forward(x, weight, bias)
        if self.asymmetric:  # ONNX Runtime's layout: a QuantizeLinear after the conv (QLinearConv fusion)
            out = self._fake_quant_activation(out, "out")
        return out


def _constant(zero: torch.Tensor) -> torch.Tensor:
    """A zero point as a fresh constant: the exporter writes it into each Q/DQ node (a buffer would be
    one shared initializer behind Identity nodes, which TensorRT's rule check cannot read)."""
    return torch.tensor(int(zero), dtype=torch.int32)


def _constant_scale(scale: torch.Tensor) -> torch.Tensor:
    """A frozen scale as a fresh constant of the same values. The exporter merges buffers of equal value
    into one initializer behind Identity nodes, and equal activation scales are common: two layers
    reading one tensor (a ResNet block's conv1 and its downsample) calibrate the same range. TensorRT's
    rule check then found a scale that "is not a constant" and the jetson target refused the model."""
    return torch.tensor(scale.detach().tolist(), dtype=scale.dtype)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What is left of a BatchNorm once folded: nothing, or timm's fused activation (BatchNormAct)."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """``model`` (a copy) with every BatchNorm that directly consumes a Conv/Linear output folded into it.

    Pairs are found by running ``example`` and matching tensors (a BN whose input *is* a layer's
    output); the folded copy must give the same logits (else the original is returned, 0 folded).
    Returns the model and the number of folded BatchNorms.
    """
    model = copy.deepcopy(model).eval()
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keeps the tensors alive so their ids stay unique
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    modules = dict(model.named_modules())
    handles = []
    for name, module in modules.items():
        if isinstance(module, WEIGHTED):

            def after(_m: nn.Module, _i: Any, out: torch.Tensor, name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1
                produced[id(out)] = name
                keep.append(out)

            handles.append(module.register_forward_hook(after))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):

            def before(_m: nn.Module, inputs: tuple[Any, ...], name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1
                if inputs and id(inputs[0]) in produced:
                    pairs.append((produced[id(inputs[0])], name))

            handles.append(module.register_forward_pre_hook(before))
    try:
        reference = model(example)
    finally:
        for handle in handles:
            handle.remove()
    folded = 0
    original = copy.deepcopy(model)
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        if calls.get(layer_name) != 1 or calls.get(bn_name) != 1 or not bn.track_running_stats:
            continue
        if bn.running_mean is None or bn.num_features != layer.weight.shape[0]:
            continue
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var + bn.eps
        )
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.weight.mul_(scale.reshape(-1, *[1] * (layer.weight.ndim - 1)))
        layer.bias = nn.Parameter(bias * scale + shift)
        _set_module(model, bn_name, _bn_replacement(bn))
        folded += 1
    if folded:
        out = model(example)
        tolerance = 1e-3 * max(1.0, float(reference.abs().max()))
        if out.shape != reference.shape or float((out - reference).abs().max()) > tolerance:
            return original, 0
    return model, folded


def attach_fake_quant(model: nn.Module, per_channel: bool, layout: str = "tensorrt") -> list[FakeQuantLayer]:
    """Wrap every Conv1d/Conv2d/Linear of ``model`` in place (``layout``: one of LAYOUTS); returns the
    wrappers."""
    names = [name for name, module in model.named_modules() if isinstance(module, WEIGHTED)]
    wrappers = []
    for name in names:
        wrapper = FakeQuantLayer(model.get_submodule(name), per_channel, asymmetric=layout == "onnxruntime")
        _set_module(model, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


class ActivationQuantiser(TensorQuantisers):
    """ONNX Runtime's fake quantiser on an element-wise op's output (Add, Mul, Sigmoid): asymmetric UINT8
    per tensor, calibrated as the layers' (kind ``out``). Exported as QuantizeLinear → DequantizeLinear
    behind the op, which with its quantised inputs is what ONNX Runtime's CPU fuses into QLinearAdd,
    QLinearMul and QLinearSigmoid (as its own PTQ quantises these ops)."""

    def __init__(self) -> None:
        super().__init__(("out",), asymmetric=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return x
        if self.observing:
            self._observe(x, "out")
            return x
        return self._fake_quant_activation(x, "out")


# Element-wise ops whose outputs ONNX Runtime's PTQ quantises and its CPU runs as fused QLinear kernels
# (QDQ → op → Q): what ORT's layout puts a fake quantiser behind. Others (Hardsigmoid, ReduceMean, ...)
# have no such kernel; quantised, they would only add Q/DQ pairs, so they stay float as in PTQ.
ELEMENTWISE_FUNCTIONS = {operator.add: "Add", torch.add: "Add", operator.mul: "Mul", torch.mul: "Mul",
                         torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid"}  # fmt: skip
ELEMENTWISE_METHODS = {"add": "Add", "mul": "Mul", "sigmoid": "Sigmoid"}
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)  # in eval mode: the input itself


class _QuantisedLeaves(fx.Tracer):
    """Traces through a model but not into its fake quantisers (their branches are run-time state)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, TensorQuantisers) or super().is_leaf_module(module, qualified_name)


def _elementwise_op(graph_module: fx.GraphModule, node: fx.Node) -> str | None:
    """The ONNX op ``node`` exports as, when it is one of ORT's fused element-wise ops on float tensors
    (an Add or Mul of two tensors: not a tensor and a constant, which ORT folds into the neighbours)."""
    if node.op == "call_function":
        op = ELEMENTWISE_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        op = ELEMENTWISE_METHODS.get(str(node.target))
    elif node.op == "call_module":
        op = "Sigmoid" if isinstance(graph_module.get_submodule(str(node.target)), nn.Sigmoid) else None
    else:
        op = None
    if op is None or not _float_tensor(node):
        return None
    if op in ("Add", "Mul"):
        operands = [*node.args[:2], *node.kwargs.values()]
        if len(operands) < 2 or not all(isinstance(a, fx.Node) and _float_tensor(a) for a in operands[:2]):
            return None
    return op


def _float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _tensor_operands(node: fx.Node) -> list[fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and _float_tensor(a)]


def _quantised(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output has passed a quantiser (in ONNX Runtime's layout a layer's output has),
    looking through modules that pass their input on unchanged (Identity, eval-mode Dropout)."""
    while node.op == "call_module":
        module = graph_module.get_submodule(str(node.target))
        if isinstance(module, TensorQuantisers):
            return module.asymmetric
        if not isinstance(module, PASS_THROUGH) or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


def _quantise_output(graph_module: fx.GraphModule, node: fx.Node, index: int) -> ActivationQuantiser:
    """Insert an :class:`ActivationQuantiser` behind ``node``, feeding every user of ``node``."""
    quantiser = ActivationQuantiser()
    name = f"activation_quantiser_{index}"
    graph_module.add_submodule(name, quantiser)
    with graph_module.graph.inserting_after(node):
        quantised = graph_module.graph.call_module(name, (node,))
    quantised.meta["tensor_meta"] = node.meta["tensor_meta"]  # read when its users are matched
    node.replace_all_uses_with(quantised, delete_user_cb=lambda user: user is not quantised)
    return quantiser


# Gated activations x * gate(x) as modules and functions, with their gate: written out, the Mul gets ORT's
# quantisers (QLinearMul) and a Sigmoid gate its own (QLinearSigmoid), as ORT's PTQ quantises them.
GATED_MODULES = {nn.SiLU: torch.sigmoid, nn.Hardswish: F.hardsigmoid}
GATED_FUNCTIONS = {F.silu: torch.sigmoid, F.hardswish: F.hardsigmoid}


def _decompose_gated_activations(graph_module: fx.GraphModule) -> int:
    """Rewrite every SiLU as ``x * sigmoid(x)`` and every Hardswish as ``x * hardsigmoid(x)`` (modules
    or functions): ONNX Runtime runs them as a gate and a Mul, and quantises both. Returns the count."""
    graph, count = graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op == "call_module":
            gate_fn = GATED_MODULES.get(type(graph_module.get_submodule(str(node.target))))
        else:
            gate_fn = GATED_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        if gate_fn is None:
            continue
        source = node.args[0]
        with graph.inserting_after(node):
            gate = graph.call_function(gate_fn, (source,))
        with graph.inserting_after(gate):
            product = graph.call_function(operator.mul, (source, gate))
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        count += 1
    graph_module.recompile()
    return count


RELU_FUNCTIONS = (F.relu, torch.relu)


def _is_relu(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(str(node.target)), nn.ReLU)
    return (node.op == "call_function" and node.target in RELU_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("relu", "relu_")
    )


def _fold_relus(graph_module: fx.GraphModule) -> int:
    """Mark each layer whose output only a ReLU reads (through Identity/Dropout) as ``relu_follows``:
    its output quantiser then takes the ReLU's range, [0, max] with zero point 0, which clamps as the ReLU
    does. ORT's PTQ quantises a Conv -> Relu pair so and drops the Relu; with the conv's own range
    instead, ORT dropped the Relu but kept a DequantizeLinear -> QuantizeLinear requantisation between the
    two ranges (MobileNetV3-Small: 14 of them, QAD 1.05x PTQ's p50). Returns the count."""
    folded = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        layer = graph_module.get_submodule(str(node.target))
        if not isinstance(layer, FakeQuantLayer) or not layer.asymmetric:
            continue
        reader = node
        while len(reader.users) == 1:
            (reader,) = reader.users
            if reader.op != "call_module" or not isinstance(
                graph_module.get_submodule(str(reader.target)), PASS_THROUGH
            ):
                break
        if reader is not node and _is_relu(graph_module, reader):
            layer.relu_follows = True
            folded += 1
    return folded


def attach_activation_quantisers(
    model: nn.Module, example: torch.Tensor
) -> tuple[nn.Module, list[ActivationQuantiser], dict[str, Any]]:
    """ONNX Runtime's layout beyond the weighted layers: ``model`` (its Conv/Linear already wrapped)
    traced with torch.fx, SiLU and Hardswish written as ``x * sigmoid(x)`` and ``x * hardsigmoid(x)``,
    and an :class:`ActivationQuantiser` behind every Add/Mul of two tensors and every Sigmoid, and on
    each of their inputs that no quantiser covers yet (e.g. a Hardsigmoid gate), so the export
    quantises those ops' inputs and outputs as ORT's own PTQ does; a layer read only by a ReLU takes
    the ReLU's range (:func:`_fold_relus`). Without them EfficientNet-B0's 65 SiLUs and its residual
    Adds ran in float between DQ/Q pairs (125 DequantizeLinear left in ORT's optimised graph against
    PTQ's 18: 1.22x PTQ's p50, benchmarks/results/qad_latency.json).

    Returns the traced model, its quantisers and a record; a model torch.fx cannot trace (or whose
    trace computes something else) is returned as it was, with no quantisers and the reason recorded.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    wrappers = [m for m in model.modules() if isinstance(m, TensorQuantisers)]
    for wrapper in wrappers:
        wrapper.bypass = True
    try:
        with torch.no_grad():
            reference = model.eval()(example)
            try:
                traced = fx.GraphModule(model, _QuantisedLeaves().trace(model))
                gated = _decompose_gated_activations(traced)
                ShapeProp(traced).propagate(example)
            except Exception as exc:  # dynamic control flow, untraceable ops: keep the layers' quantisers
                reason = f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: "
                return model, [], {"count": 0, "ops": {}, "skipped": reason + first_line(exc, "")}
            quantisers: list[ActivationQuantiser] = []
            ops: dict[str, int] = {}
            for node in list(traced.graph.nodes):
                op = _elementwise_op(traced, node)
                if op is None:
                    continue
                for operand in _tensor_operands(node):  # ORT fuses the op only when its inputs are DQ too
                    if not _quantised(traced, operand):
                        quantisers.append(_quantise_output(traced, operand, len(quantisers)))
                        ops["inputs"] = ops.get("inputs", 0) + 1
                quantisers.append(_quantise_output(traced, node, len(quantisers)))
                ops[op] = ops.get(op, 0) + 1
            traced.graph.lint()
            traced.recompile()
            for quantiser in quantisers:
                quantiser.bypass = True
            same = traced(example)
            for quantiser in quantisers:
                quantiser.bypass = False
            if same.shape != reference.shape or not torch.allclose(same, reference, rtol=1e-4, atol=1e-5):
                reason = "torch.fx's trace of the model computes different logits"
                return model, [], {"count": 0, "ops": {}, "skipped": reason}
            relus = _fold_relus(traced)  # marks the shared layers: only once the trace is kept
    finally:
        for wrapper in wrappers:
            wrapper.bypass = False
    record = {
        "count": len(quantisers),
        "ops": ops,
        "gated_activations_decomposed": gated,
        "relu_folded": relus,
        "skipped": None,
    }
    return traced, quantisers, record


@torch.no_grad()
def chained_pairs(
    model: nn.Module, wrappers: list[TensorQuantisers], example: torch.Tensor
) -> list[tuple[TensorQuantisers, TensorQuantisers]]:
    """``(a, b)`` pairs where ``b``'s input is ``a``'s output (the same storage and the same values,
    perhaps reshaped: nothing computed between, in place or not), found by running ``example``
    through the float layers."""
    produced: dict[tuple[int, int], tuple[TensorQuantisers, torch.Tensor, torch.Tensor]] = {}
    pairs: list[tuple[TensorQuantisers, TensorQuantisers]] = []
    handles = []
    for wrapper in wrappers:

        def before(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            found = produced.get((inputs[0].data_ptr(), inputs[0].numel())) if inputs else None
            if found is None or found[0] is module:
                return
            if torch.equal(inputs[0].reshape(-1), found[2]):  # an in-place activation changes the values
                pairs.append((found[0], module))

        def after(module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            # the output is kept alive (its storage is not reused) and its values copied
            produced[(out.data_ptr(), out.numel())] = (module, out, out.detach().clone().reshape(-1))

        handles += [wrapper.register_forward_pre_hook(before), wrapper.register_forward_hook(after)]
        wrapper.bypass = True
    try:
        model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
        for wrapper in wrappers:
            wrapper.bypass = False
    return pairs


def tie_learned_ranges(pairs: list[tuple[TensorQuantisers, TensorQuantisers]]) -> int:
    """Make each chained input quantiser share its producer's learned output range (one Parameter).

    In ONNX Runtime's layout a conv feeding a conv directly exports Q -> DQ -> Q -> DQ on one tensor.
    Calibrated, both pairs hold the same scale and zero point (the same tensor's min/max) and ONNX
    Runtime's DoubleQDQPairsRemover drops the middle DQ -> Q exactly; learned apart, it merges them
    into one new range (their intersection), which is not what was trained: EfficientNet-B0 (7 such
    pairs) and MobileNetV3 then failed the parity gate (96 % top-1 agreement). Tied, the second
    quantiser is the identity on already quantised values, as ORT computes it. The same holds behind
    an element-wise op's quantiser (:class:`ActivationQuantiser`) feeding a layer. Returns the count.
    """
    tied = 0
    for source, sink in pairs:
        if source.learned is None or sink.learned is None or not source.asymmetric:
            continue
        if "out_scale_range" not in source.learned or "act_scale_range" not in sink.learned:
            continue
        sink.learned["act_scale_range"] = source.learned["out_scale_range"]
        sink.learned["act_zero_range"] = source.learned["out_zero_range"]
        tied += 1
    return tied


@torch.no_grad()
def calibrate(
    model: nn.Module, wrappers: list[TensorQuantisers], frames: np.ndarray, batch: int = 64
) -> None:
    """Activation ranges of each quantiser over ``frames`` (min/max, the PTQ rung's rule): symmetric
    max |input| / 127, or ONNX Runtime's asymmetric UINT8 of the input and the output."""
    model.eval()
    for wrapper in wrappers:
        wrapper.observing = True
        wrapper.reset_observed()
    try:
        for start in range(0, len(frames), batch):
            model(torch.from_numpy(np.ascontiguousarray(frames[start : start + batch])))
    finally:
        for wrapper in wrappers:
            wrapper.observing = False
    for wrapper in wrappers:
        wrapper.set_ranges()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    model.eval()
    return np.concatenate(
        [
            model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))).numpy()
            for i in range(0, len(x), batch)
        ]
    )


@dataclass
class QadData:
    """What fine-tuning reads: frames, labels (-1: unlabelled) and the teacher's logits for them."""

    x: np.ndarray
    y: np.ndarray
    teacher_logits: np.ndarray


def is_logit_method(method_cls: type) -> bool:
    """A method whose loss needs only the teacher's logits per sample (so the teacher cache serves it)."""
    return bool(
        method_cls.needs_teacher
        and not method_cls.needs_features
        and not method_cls.needs_feature_maps
        and not method_cls.mixes_inputs
        and not method_cls.needs_teacher_dataset
        and method_cls.held_out_fraction == 0
    )


def qad_loss_method(spec: Any, classes: int, feature_dim: int) -> tuple[nn.Module, str]:
    """The recipe's method when it is a logit method, else Hinton KD; and its name."""
    from edgekd.distill.methods import METHODS, ModelShape, build_method

    name = spec.method if is_logit_method(METHODS.get(spec.method)) else "kd"
    shape = ModelShape(feature_dim)
    return build_method(spec.model_copy(update={"method": name}), classes, shape, shape), name


def fine_tune(
    model: nn.Module,
    method: nn.Module,
    data: QadData,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Callable[[str], None] = print,
    range_lr: float | None = None,
) -> list[dict[str, float]]:
    """AdamW on the fake-quantised ``model`` (eval mode: BN statistics and dropout frozen), cosine LR.

    Loss per batch: ``method.loss`` (student vs cached teacher logits) + CE on labelled rows. Learned
    activation ranges (parameters named ``*_range``, :meth:`FakeQuantLayer.learn_ranges`) train at
    ``range_lr`` (default ``lr``). Returns the mean loss per epoch.
    """
    from edgekd.distill.methods import ModelOutputs, label_ce

    generator = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ranges = [p for n, p in named if n.endswith("_range")]
    weights = [p for n, p in named if not n.endswith("_range")] + list(method.parameters())
    groups = [{"params": weights, "lr": lr}]
    if ranges:
        groups.append({"params": ranges, "lr": range_lr or lr})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(data.x) / batch_size))
    steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    model.eval()
    history, step = [], 0
    for epoch in range(epochs):
        order = torch.randperm(len(data.x), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = np.sort(order[start : start + batch_size])
            x = torch.from_numpy(np.ascontiguousarray(data.x[rows]))
            y = torch.from_numpy(np.asarray(data.y[rows], dtype=np.int64))
            teacher = ModelOutputs(torch.from_numpy(np.asarray(data.teacher_logits[rows], dtype=np.float32)))
            student = ModelOutputs(model(x))
            state = {"epoch": epoch, "epochs": epochs, "step": step, "steps": steps}
            loss = method.loss(student, teacher, y, state) + label_ce(student.logits, y)
            if not torch.isfinite(loss):
                raise QuantizeError(
                    f"QAD diverged at epoch {epoch + 1} (loss {float(loss)}); "
                    f"lower quantize.qad_lr (now {lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(rows)
            step += 1
        history.append({"epoch": epoch + 1, "loss": round(total / len(order), 6)})
        log(f"  QAD epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}")
    return history


def qdq_layout(backend: str) -> str:
    """The QDQ layout QAD exports for a backend: ONNX Runtime's own for ``onnxruntime``, else TensorRT's."""
    return "onnxruntime" if backend == "onnxruntime" else "tensorrt"


def freeze_all(model: nn.Module) -> None:
    """Freeze every fake quantiser of ``model`` (weight scales fixed, biases stored on the INT32 grid)."""
    for module in model.modules():
        if isinstance(module, TensorQuantisers) and not module.frozen:
            module.freeze()


def qlinear_fusable_convs(path: Path) -> tuple[int, int]:
    """``(fusable, total)`` Conv/Gemm/MatMul nodes of a QDQ model: fusable when every input comes from a
    DequantizeLinear and the output goes only to a QuantizeLinear (what ORT fuses to QLinearConv/QGemm)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    weighted = [node for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    fusable = sum(
        all(producer.get(name) == "DequantizeLinear" for name in node.input[:2])
        and consumers.get(node.output[0], []) == ["QuantizeLinear"]
        for node in weighted
    )
    return fusable, len(weighted)


def export_qdq(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> dict[str, Any]:
    """The fake-quantised ``model`` (weight scales frozen) as one QDQ ONNX file (TorchScript exporter).

    Each fake quantiser becomes QuantizeLinear → DequantizeLinear with a constant scale and an INT8
    zero point 0; biases stay float. The batch axis is dynamic.
    """
    import warnings

    import onnx

    from edgekd.export.onnx import INPUT_NAME, OUTPUT_NAME

    freeze_all(model)
    model.eval()
    example = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=QAD_EXPORT_OPSET,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                dynamo=False,
            )
            onnx.checker.check_model(str(tmp))
    except QuantizeError:
        raise
    except Exception as exc:
        raise QuantizeError(
            f"cannot export the QAD model {type(model).__name__} to QDQ ONNX: {type(exc).__name__}: "
            f"{first_line(exc, '')}; set quantize.mode: ptq"
        ) from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    return {
        "exporter": f"torch.onnx.export (TorchScript) torch {torch.__version__}",
        "opset": QAD_EXPORT_OPSET,
        "quantize_linear_nodes": ops.count("QuantizeLinear"),
        "dequantize_linear_nodes": ops.count("DequantizeLinear"),
        "size_bytes": path.stat().st_size,
    }


def onnx_logits(path: Path, x: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    from edgekd.backends.onnxruntime import cpu_session

    session = cpu_session(path)  # intra-op threads sized as PyTorch's (edgekd.threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def parity_gate(
    torch_out: np.ndarray, onnx_out: np.ndarray, where: str, float_out: np.ndarray | None = None
) -> dict[str, Any]:
    """Gate the ONNX artifact against the fake-quant PyTorch model; QuantizeError naming the numbers.

    Passes when the 99th percentile of |logit difference| is within the larger of one quantisation
    step of the logits (max |logit| / 127 of the PyTorch model) and the model's own quantisation noise
    (p99 |fake-quant - float logits|, when ``float_out`` is given), and top-1 agreement is >= 99 % on
    the *decided* frames: those whose top-1 margin in the PyTorch model exceeds twice that p99, the
    most the accepted differences can move two logits apart. Why the tolerance: two correct float32
    implementations of a deep fake-quantised network sum in a different order, so a few values sitting
    on a rounding tie quantise one step apart, and those flips propagate like quantisation noise
    (EfficientNet-B0 on digits: 2e-6 of the first quantiser's values differ, and at the logits the gap
    is 0.6x the model's whole quantisation noise, 0.9x one logit step). Why decided frames: a briefly
    trained student has near-tied logits, and differences of that size flip them (a 4-epoch
    EfficientNet-B0: p99 |diff| 0.044 against a tolerance of 2.7, yet 1.3 % of top-1 flipped, every
    one a near-tie). A wrong scale, axis or bias exceeds the tolerance, or flips decided frames.
    """
    agrees = torch_out.argmax(axis=1) == onnx_out.argmax(axis=1)
    agreement = float(np.mean(agrees))
    diff = np.abs(torch_out.astype(np.float64) - onnx_out.astype(np.float64))
    step = float(np.abs(torch_out).max()) / QMAX
    noise = None
    if float_out is not None:
        noise = float(np.percentile(np.abs(torch_out.astype(np.float64) - float_out), 99))
    tolerance = max(step, noise or 0.0)
    p99 = float(np.percentile(diff, 99))
    top_two = np.sort(torch_out.astype(np.float64), axis=1)[:, -2:]
    decided = (
        (top_two[:, 1] - top_two[:, 0]) > 2 * p99 if torch_out.shape[1] > 1 else np.ones(len(agrees), bool)
    )
    decided_agreement = float(np.mean(agrees[decided])) if decided.any() else 1.0
    record = {
        "frames": len(torch_out),
        "top1_agreement": round(agreement, 6),
        "decided_frames": int(decided.sum()),
        "top1_agreement_decided": round(decided_agreement, 6),
        "min_top1_agreement": MIN_AGREEMENT,
        "logit_abs_diff_p99": p99,
        "logit_abs_diff_max": float(diff.max()),
        "quantisation_step": step,
        "quantisation_noise_p99": noise,
        "logit_tolerance": tolerance,
        "passed": decided_agreement >= MIN_AGREEMENT and p99 <= tolerance,
    }
    if not record["passed"]:
        raise QuantizeError(
            f"{where}: QAD parity gate failed: ONNX vs fake-quant PyTorch top-1 agreement "
            f"{decided_agreement:.2%} on the {int(decided.sum())} frames with a top-1 margin over 2 x p99 "
            f"|logit diff| (need >= {MIN_AGREEMENT:.0%}; {agreement:.2%} on all {len(torch_out)}), "
            f"p99 |logit diff| {p99:.4g} vs tolerance {tolerance:.4g} (one quantisation step {step:.4g}, "
            f"quantisation noise {noise if noise is not None else 'n/a'}); set quantize.mode: ptq and report "
            "this model"
        )
    return record


@torch.no_grad()
def float_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` with every fake quantiser bypassed (the float network it wraps)."""
    wrappers = [module for module in model.modules() if isinstance(module, TensorQuantisers)]
    for wrapper in wrappers:
        wrapper.bypass = True
    try:
        return torch_logits(model, x)
    finally:
        for wrapper in wrappers:
            wrapper.bypass = False


def range_change(calibrated: list[torch.Tensor], wrappers: list[FakeQuantLayer]) -> dict[str, float]:
    """How far the (input) activation scales moved from calibration: median and max |relative change|."""
    change = [abs(float(w.act_scale) / float(c) - 1) for c, w in zip(calibrated, wrappers, strict=True)]
    return {"median": round(float(np.median(change)), 6), "max": round(float(np.max(change)), 6)}


def quantisation_aware_distillation(
    student: nn.Module,
    input_shape: tuple[int, ...],
    calibration: np.ndarray,
    data: QadData,
    method: nn.Module,
    out_path: Path,
    held_out: np.ndarray,
    *,
    per_channel: bool,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    score: Callable[[nn.Module], float] | None = None,
    layout: str = "tensorrt",
    learn_ranges: bool = False,
    range_lr: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fold BN, fake-quantise in ``layout``, calibrate on ``calibration``, fine-tune, export the QDQ
    ONNX, gate it.

    ``layout="onnxruntime"`` (ONNX Runtime targets, :func:`qdq_layout`) trains and exports ORT's own
    QDQ layout (UINT8 asymmetric activations, a QuantizeLinear after every Conv/Gemm: QLinearConv
    fusion); should its parity gate fail, QAD is run again in TensorRT's layout and
    ``layout_fallback`` says why. ``score`` (optional): accuracy of a fake-quant model, recorded
    before (the PTQ start) and after. Returns the record (what was done, the history, the parity
    gate, the TensorRT rule check, the QLinearConv-fusable count).
    """
    from edgekd.quantize.qdq_rules import tensorrt_qdq_violations

    if layout not in LAYOUTS:
        raise QuantizeError(f"unknown QAD layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    example = torch.from_numpy(np.ascontiguousarray(calibration[: min(8, len(calibration))]))
    model, folded = fold_batchnorm(student, example)
    wrappers = attach_fake_quant(model, per_channel, layout)
    if not wrappers:
        raise QuantizeError(
            f"QAD: {type(student).__name__} has no Conv1d/Conv2d/Linear layer to quantise; "
            "set quantize.mode: ptq"
        )
    if layout == "onnxruntime":
        model, activations, activation_record = attach_activation_quantisers(model, example)
        if activation_record["skipped"]:
            log(f"  QAD: element-wise ops stay float ({activation_record['skipped']})")
    else:
        activations, activation_record = [], {"count": 0, "ops": {}, "skipped": TENSORRT_ACTIVATIONS}
    quantisers: list[TensorQuantisers] = [*wrappers, *activations]
    calibrate(model, quantisers, calibration)
    start_accuracy = score(model) if score is not None else None
    calibrated = [wrapper.act_scale.clone() for wrapper in wrappers]
    tied = 0
    if learn_ranges and epochs:
        for quantiser in quantisers:
            quantiser.learn_ranges()
        tied = tie_learned_ranges(chained_pairs(model, quantisers, example))
    history = fine_tune(model, method, data, epochs, lr, batch_size, seed, log, range_lr) if epochs else []
    tuned_accuracy = score(model) if score is not None else None
    export = export_qdq(model, input_shape, out_path)
    try:
        parity = parity_gate(
            torch_logits(model, held_out),
            onnx_logits(out_path, held_out),
            str(out_path),
            float_logits(model, held_out),
        )
    except QuantizeError as exc:
        if layout == "tensorrt":
            raise
        reason = f"ONNX Runtime's QDQ layout refused: {exc}"
        log(f"  QAD: {reason}; running QAD again in TensorRT's layout (slower on ONNX Runtime's CPU)")
        record = quantisation_aware_distillation(
            student, input_shape, calibration, data, method, out_path, held_out,
            per_channel=per_channel, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
            score=score, layout="tensorrt", learn_ranges=learn_ranges, range_lr=range_lr, log=log,
        )  # fmt: skip
        return {**record, "layout_fallback": reason, "seconds": round(time.perf_counter() - started, 3)}
    violations = tensorrt_qdq_violations(out_path, per_channel=per_channel)
    fusable, weighted = qlinear_fusable_convs(out_path)
    asymmetric = layout == "onnxruntime"
    return {
        "format": "QDQ",
        "tool": "edgekd QAD (torch.fake_quantize_* with STE)",
        "layout": layout,
        "layout_fallback": None,
        "weight_type": "QInt8",
        "activation_type": "QUInt8" if asymmetric else "QInt8",
        "per_channel": per_channel,
        "method": "minmax",
        "symmetric": not asymmetric,
        "symmetric_activations": not asymmetric,
        "zero_point": "activations asymmetric, weights 0" if asymmetric else 0,
        "ranges": (
            "activations: calibrated min/max"
            + (
                " (ONNX Runtime's asymmetric UINT8 rule on each Conv/Gemm input and output)"
                if asymmetric
                else ""
            )
            + (", then learned (LSQ), frozen for export" if learn_ranges and epochs else ", frozen")
            + "; weights: max |w| per channel, follow them"
        ),
        "learn_ranges": bool(learn_ranges and epochs),
        "range_lr": (range_lr or lr) if learn_ranges and epochs else None,
        "range_change": range_change(calibrated, wrappers),
        "tied_ranges": tied,
        "batchnorm_folded": folded,
        "quantized_layers": len(wrappers),
        "activation_quantisers": activation_record,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "train_frames": len(data.x),
        "history": history,
        "fake_quant_accuracy_start": start_accuracy,
        "fake_quant_accuracy_tuned": tuned_accuracy,
        "export": export,
        "parity": parity,
        "tensorrt_rules": {"violations": violations[:10], "complies": not violations},
        "qlinear_fusable": {"fusable": fusable, "conv_gemm_matmul": weighted},
        "seconds": round(time.perf_counter() - started, 3),
    }
