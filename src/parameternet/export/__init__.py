"""Deployment: :func:`~parameternet.export.folding.deploy` folds BatchNorm into the experts and merges RepConv
branches (:mod:`.folding`); :func:`~parameternet.export.onnx_export.export_onnx` writes and checks an ONNX graph
(:mod:`.onnx_export`); :func:`~parameternet.export.ort_nchwc.optimize_for_onnxruntime` rewrites it for ONNX
Runtime's blocked layout (:mod:`.ort_nchwc`). Each is imported on its own: this package imports nothing."""
