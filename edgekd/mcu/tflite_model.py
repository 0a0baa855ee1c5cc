"""What a ``.tflite`` model holds, read from its flatbuffer: operators in execution order with their
shapes and multiply-accumulates, the distinct builtin ops (the op resolver's list), and the input and
output tensors with their quantisation (scale, zero point).

Reads the flatbuffer with the schema module that ``tflite-micro`` ships (the mcu extra).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import BackendUnavailable, ModelError

# TFLite builtin op name -> MicroMutableOpResolver method (TFLM's micro_mutable_op_resolver.h).
RESOLVER_METHODS = {
    "ADD": "AddAdd",
    "AVERAGE_POOL_2D": "AddAveragePool2D",
    "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize",
    "FULLY_CONNECTED": "AddFullyConnected",
    "HARD_SWISH": "AddHardSwish",
    "LOGISTIC": "AddLogistic",
    "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean",
    "MUL": "AddMul",
    "PAD": "AddPad",
    "QUANTIZE": "AddQuantize",
    "RELU": "AddRelu",
    "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape",
    "SOFTMAX": "AddSoftmax",
    "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub",
    "TANH": "AddTanh",
    "TRANSPOSE": "AddTranspose",
    "EXPAND_DIMS": "AddExpandDims",
    "SUM": "AddSum",
    "BATCH_MATMUL": "AddBatchMatMul",
    "GATHER": "AddGather",
    "SLICE": "AddSlice",
    "SPLIT": "AddSplit",
    "PACK": "AddPack",
    "UNPACK": "AddUnpack",
    "LEAKY_RELU": "AddLeakyRelu",
    "PRELU": "AddPrelu",
    "RSQRT": "AddRsqrt",
    "SQUARED_DIFFERENCE": "AddSquaredDifference",
}


def _schema() -> Any:
    try:
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema
    except ImportError as exc:
        raise BackendUnavailable(
            f"reading a .tflite model needs tflite-micro ({exc}); install it with: pip install -e '.[mcu]'"
        ) from None
    return schema


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OpInfo:
    op: str
    inputs: list[list[int]]
    output: list[int]
    macs: int
    output_elements: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TfliteModel:
    """The parts of a ``.tflite`` model the fit check, the cycle estimate and the firmware need."""

    size_bytes: int
    ops: list[OpInfo]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    weight_bytes: int
    subgraphs: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def op_types(self) -> list[str]:
        """Distinct builtin ops in first-use order: what the op resolver must register."""
        return list(dict.fromkeys(op.op for op in self.ops))

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    def io_bytes(self) -> int:
        """Bytes of the input and output tensors (one inference)."""
        return sum(_nbytes(t) for t in (*self.inputs, *self.outputs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size_bytes": self.size_bytes,
            "weight_bytes": self.weight_bytes,
            "macs": self.macs,
            "op_types": self.op_types,
            "op_counts": {name: sum(op.op == name for op in self.ops) for name in self.op_types},
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "subgraphs": self.subgraphs,
        }


_ITEM_BYTES = {
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "float32": 4,
    "float16": 2,
    "int64": 8,
    "bool": 1,
}


def _nbytes(tensor: TensorInfo) -> int:
    return int(np.prod(tensor.shape or [1])) * _ITEM_BYTES.get(tensor.dtype, 4)


def _names(enum: type) -> dict[int, str]:
    return {value: key for key, value in vars(enum).items() if not key.startswith("_")}


def _macs(op: str, weight_shape: list[int] | None, out_elements: int, out_shape: list[int]) -> int:
    """Multiply-accumulates of one op: convolutions and fully connected layers; 0 for the rest."""
    if weight_shape is None:
        return 0
    if op == "CONV_2D":  # weights [Cout, KH, KW, Cin]
        return out_elements * int(np.prod(weight_shape[1:]))
    if op == "DEPTHWISE_CONV_2D":  # weights [1, KH, KW, Cout]
        return out_elements * int(np.prod(weight_shape[1:3]))
    if op == "FULLY_CONNECTED":  # weights [Out, In]
        return out_elements * int(weight_shape[-1])
    return 0


def read_tflite(source: Path | bytes) -> TfliteModel:
    """Parse ``source`` (a ``.tflite`` path or its bytes); ModelError when it is not a TFLite flatbuffer."""
    schema = _schema()
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    where = str(source) if isinstance(source, (str, Path)) else "the model bytes"
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(f"{where}: not a TFLite flatbuffer (no 'TFL3' identifier); reconvert the model")
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(data), 0))
    except Exception as exc:  # flatbuffers raises plain exceptions on damaged input
        raise ModelError(f"{where}: damaged TFLite flatbuffer ({type(exc).__name__}); reconvert it") from None
    op_names, type_names = _names(schema.BuiltinOperator), _names(schema.TensorType)
    graph = model.subgraphs[0]
    tensors = graph.tensors

    def tensor(index: int) -> TensorInfo:
        item = tensors[index]
        quant = item.quantization
        scale = zero = None
        if quant is not None and quant.scale is not None and len(quant.scale) == 1:
            scale, zero = float(quant.scale[0]), int(quant.zeroPoint[0])
        name = item.name.decode() if isinstance(item.name, bytes) else str(item.name)
        shape = [int(d) for d in (item.shape if item.shape is not None else [])]
        return TensorInfo(name, shape, type_names.get(item.type, str(item.type)).lower(), scale, zero)

    ops = []
    for operator in graph.operators or []:
        code = model.operatorCodes[operator.opcodeIndex]
        name = op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), f"BUILTIN_{code.builtinCode}")
        if name == "CUSTOM":
            name = f"CUSTOM:{code.customCode.decode() if code.customCode else '?'}"
        ins = [tensor(i).shape if i >= 0 else [] for i in operator.inputs]
        out = tensor(operator.outputs[0]).shape if len(operator.outputs) else []
        elements = int(np.prod(out)) if out else 0
        weights = (
            ins[1] if len(ins) > 1 and name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") else None
        )
        ops.append(OpInfo(name, ins, out, _macs(name, weights, elements, out), elements))
    weight_bytes = sum(len(b.data) for b in model.buffers or [] if b.data is not None)
    return TfliteModel(
        size_bytes=len(data),
        ops=ops,
        inputs=[tensor(i) for i in graph.inputs],
        outputs=[tensor(i) for i in graph.outputs],
        weight_bytes=int(weight_bytes),
        subgraphs=len(model.subgraphs),
    )
