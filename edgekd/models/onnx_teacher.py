"""A teacher the user has only as an ONNX file (``onnx:path/teacher.onnx``), run by ONNX Runtime.

:class:`OnnxTeacher` is an ``nn.Module`` without parameters that runs the graph with ONNX Runtime's
CPU provider on torch tensors. Logit-based distillation (Hinton, Vinyals, Dean, "Distilling the
Knowledge in a Neural Network", 2015, and its successors) needs only its outputs; embedding-based
methods also need the classifier's input. When the graph's output comes from a final ``Gemm`` or
``MatMul`` (+ ``Add``) with constant weights, that node's input is exposed as an extra graph output
(on a copy of the model, in memory) and the node's weights become ``head``, so
``head(forward_features(x))`` gives the logits as in every edgekd model; otherwise the embedding is
the logits themselves (said once). Feature maps (hint layers) are not available from an ONNX file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import ModelError, first_line

_NP_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # ONNX elem_type -> numpy


class FrozenLinear(nn.Module):
    """``x @ weight.T + bias`` with the weights as buffers (the ONNX teacher has no parameters)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Identity(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.in_features = self.out_features = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a core dependency
        raise ModelError("ONNX teachers need the onnx package: pip install onnx") from None
    return onnx


def _final_linear(model: Any, output: str) -> tuple[str, np.ndarray, np.ndarray] | None:
    """``(input name, W (C, D), b (C,))`` when ``output`` is ``x @ W.T + b`` of a final Gemm/MatMul(+Add)."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {name: node for node in graph.node for name in node.output}
    node = producer.get(output)
    if node is None:
        return None
    bias = None
    if node.op_type == "Add":
        inputs = list(node.input)
        const = [name for name in inputs if name in constants]
        other = [name for name in inputs if name not in constants]
        if len(const) != 1 or len(other) != 1 or producer.get(other[0]) is None:
            return None
        bias, node = constants[const[0]], producer[other[0]]
        if node.op_type != "MatMul":
            return None
    if node.op_type == "MatMul":
        x, w = node.input
        if w not in constants or constants[w].ndim != 2:
            return None
        weight = constants[w].T
        bias = np.zeros(weight.shape[0], weight.dtype) if bias is None else bias
    elif node.op_type == "Gemm":
        attrs = {attr.name: attr for attr in node.attribute}
        if "transA" in attrs and attrs["transA"].i:
            return None
        x, w = node.input[0], node.input[1]
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if w not in constants or (c is not None and c not in constants):
            return None
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        weight = constants[w] if "transB" in attrs and attrs["transB"].i else constants[w].T
        weight = alpha * weight
        bias = beta * constants[c] if c is not None else np.zeros(weight.shape[0], weight.dtype)
    else:
        return None
    bias = np.asarray(bias).reshape(-1)
    if bias.size == 1:
        bias = np.full(weight.shape[0], bias.item(), weight.dtype)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        return None
    return x, weight.astype(np.float32), bias.astype(np.float32)


def _dims(value_info: Any) -> list[int | str | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


class OnnxTeacher(nn.Module):
    """An ONNX classifier (inputs (B, *input_shape) -> logits (B, num_classes)) as a frozen teacher.

    ``input_shape`` (one sample's shape) is checked against the graph's input; a fixed batch axis
    is served in chunks of that size. Every problem is one :class:`ModelError` line naming the file.
    """

    hint_layers: tuple[str, ...] = ()

    def __init__(
        self,
        path: str | Path,
        num_classes: int,
        input_shape: tuple[int, ...] | None = None,
        role: str = "teacher",
        log: Any = print,
    ) -> None:
        super().__init__()
        onnx = _onnx()
        self.path, self.num_classes, self.role = Path(path), num_classes, role
        try:
            model = onnx.load(str(self.path))
        except FileNotFoundError:
            raise ModelError(f"{role} ONNX file {self.path} not found; pass an existing .onnx file") from None
        except Exception as exc:  # protobuf decode errors and friends
            raise ModelError(
                f"{role} ONNX file {self.path} is not a readable ONNX model ({type(exc).__name__}: "
                f"{first_line(exc)[:120]}); export it again"
            ) from None
        initializers = {init.name for init in model.graph.initializer}
        inputs = [value for value in model.graph.input if value.name not in initializers]
        if len(inputs) != 1 or not model.graph.output:
            raise ModelError(
                f"{role} ONNX file {self.path} has {len(inputs)} inputs and {len(model.graph.output)} "
                "outputs; "
                "an ONNX teacher takes one input tensor and gives the logits as its first output"
            )
        self.input_name = inputs[0].name
        dims = _dims(inputs[0])
        self.input_dtype = _NP_TYPES.get(inputs[0].type.tensor_type.elem_type, np.float32)
        shown = "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"
        if input_shape is not None:
            fits = len(dims) == len(input_shape) + 1 and all(
                not isinstance(d, int) or d == size for d, size in zip(dims[1:], input_shape, strict=True)
            )
            if not fits:
                raise ModelError(
                    f"{role} ONNX file {self.path} takes inputs of shape {shown}, but the data gives "
                    f"(batch, {', '.join(map(str, input_shape))}); export the teacher for the data's input "
                    "shape or use data that fits it"
                )
        self.input_rank = len(dims) - 1
        self.batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
        self.in_channels = int(
            input_shape[0] if input_shape else dims[1] if len(dims) > 1 and isinstance(dims[1], int) else 1
        )
        self.param_count = int(sum(int(np.prod(init.dims)) for init in model.graph.initializer))
        logits_name = model.graph.output[0].name
        found = _final_linear(model, logits_name)
        self.embedding_name = None
        if found is not None and found[1].shape[0] == num_classes:
            self.embedding_name = found[0]
            if self.embedding_name not in {value.name for value in model.graph.output}:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(self.embedding_name))
                model.graph.output[-1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            self.head: nn.Module = FrozenLinear(torch.from_numpy(found[1]), torch.from_numpy(found[2]))
        self.output_names = [logits_name] + ([self.embedding_name] if self.embedding_name else [])
        self.session = self._session(model)
        logits, embedding = self._run(np.zeros((self.batch or 1, *self._sample_shape(dims, input_shape))))
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ModelError(
                f"{role} ONNX file {self.path} gives outputs of shape {tuple(logits.shape)}, but the data "
                "has "
                f"{num_classes} classes; export a teacher with {num_classes} outputs for this data"
            )
        if embedding is not None and embedding.ndim != 2:
            self.embedding_name, self.output_names = None, [logits_name]
        if self.embedding_name is None:
            self.head = _Identity(num_classes)
            log(
                f"  {role} ONNX file {self.path}: no final linear layer found; "
                "embedding-based methods see its logits as the embedding"
            )
        self.feature_dim = int(self.head.in_features)

    @staticmethod
    def _sample_shape(dims: list[Any], input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
        if input_shape is not None:
            return tuple(input_shape)
        return tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims[1:])

    def _session(self, model: Any) -> Any:
        from edgekd.backends.onnxruntime import cpu_session

        try:  # intra-op threads sized as PyTorch's (edgekd.threads); errors-only logging
            return cpu_session(model.SerializeToString())
        except Exception as exc:  # ORT reports invalid graphs with several types
            raise ModelError(
                f"{self.role} ONNX file {self.path} does not load in ONNX Runtime ({type(exc).__name__}: "
                f"{first_line(exc)[:160]}); export it again (a supported opset) or use the PyTorch model"
            ) from None

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, embedding or None) for a batch ``x``, in chunks of a fixed batch axis."""
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        step = self.batch or max(len(x), 1)
        logits, embeddings = [], []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            rows = len(chunk)
            if self.batch and rows < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - rows, *chunk.shape[1:]), chunk.dtype)])
            try:
                outputs = self.session.run(self.output_names, {self.input_name: chunk})
            except Exception as exc:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
                raise ModelError(
                    f"{self.role} ONNX file {self.path} fails on inputs of shape {tuple(chunk.shape)} "
                    f"({type(exc).__name__}: {first_line(exc)[:160]}); check its input shape against the data"
                ) from None
            logits.append(np.asarray(outputs[0], np.float32)[:rows])
            if len(outputs) > 1:
                embeddings.append(np.asarray(outputs[1], np.float32)[:rows])
        return np.concatenate(logits), (np.concatenate(embeddings) if embeddings else None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input (B, feature_dim), or the logits when the graph has no final linear."""
        logits, embedding = self._run(x.detach().cpu().numpy())
        return torch.from_numpy(embedding if self.embedding_name else logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(x.detach().cpu().numpy())[0])
