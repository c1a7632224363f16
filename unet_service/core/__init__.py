"""The inference core: the U-Net, its geometry, tile plans, weights and their card,
precision, runtimes (PyTorch, ONNX Runtime), the batch runner and the `Segmenter`."""
