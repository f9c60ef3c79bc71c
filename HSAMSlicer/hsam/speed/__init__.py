"""Inference speed: exact work-saving encoder rewrites, int8 and ONNX Runtime engines, and the per-device modes
that :func:`hsam.inference.segment_volume` picks from (``mode="auto"``)."""
