"""Inference engines: exact work-saving encoder rewrites, bfloat16, int8 and ONNX Runtime predictors, and the
per-device, per-processor choice that :func:`hsam.pipeline.run.segment_volume` makes (``mode="auto"``)."""
