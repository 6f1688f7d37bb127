"""Builders: turn a model into served artefacts (ONNX files, the Triton model repository)."""
