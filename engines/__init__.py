"""Engines: one small interface (`engines.base.Engine`) and one module per runtime.

Heavy runtimes (OpenVINO, ONNX Runtime, torch) are imported inside their engine's module
only, and nothing in this package imports `app/` or FastAPI.
"""
