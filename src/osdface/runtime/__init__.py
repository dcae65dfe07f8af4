"""Runners of exported pipelines: one folder written by ``osdface export-onnx``, run by
:mod:`osdface.runtime.onnx_runner` (ONNX Runtime) or :mod:`osdface.runtime.openvino_runner` (OpenVINO);
what they share (manifest check, host code, call contract) is :mod:`osdface.runtime.exported`."""
