"""Runners of exported pipelines (:mod:`osdface.runtime.onnx_runner`: ONNX Runtime)."""
