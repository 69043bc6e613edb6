"""The per-kernel regression (the nn-Meter approach) for devices whose profile ships a kernel table:
``detect`` (the kernels ONNX Runtime runs), ``features``, ``fit`` and ``model`` (predicting them and the executor's
cost between them), ``calibrate`` (timing a table here). The method and its history: docs/latency-model.md."""
