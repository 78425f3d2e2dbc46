"""shopguide's model service: FastAPI over ONNX Runtime, personalised with Feast online features."""
