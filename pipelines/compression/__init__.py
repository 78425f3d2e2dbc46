"""Compression: distillation, pruning, ONNX export + INT8, and the variant suite that picks the served one."""
