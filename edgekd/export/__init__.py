"""ONNX export of a trained model and its parity check against PyTorch."""

from edgekd.export.onnx import check_parity, export_onnx

__all__ = ["check_parity", "export_onnx"]
