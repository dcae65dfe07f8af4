"""Exporters of a loaded pipeline to other runtimes (:mod:`osdface.export.onnx`: ONNX graphs + manifest)."""
