"""Post-training INT8 quantisation: calibration data with provenance, ONNX Runtime static QDQ."""

from edgekd.quantize.calibration import CalibrationDataReader, CalibrationSet
from edgekd.quantize.ort import quantize_static_int8

__all__ = ["CalibrationDataReader", "CalibrationSet", "quantize_static_int8"]
