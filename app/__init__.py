"""The HTTP inference service: FastAPI app, cross-request tile batcher, KServe v2 API."""
