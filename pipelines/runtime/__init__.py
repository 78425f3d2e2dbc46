"""What a served model needs at request time: ONNX encoder, product and lexical indexes, fusion, top-k, personalisation.

Imports nothing else of pipelines: the service and the offline evaluation both use it, so the figures
measure what is served."""
