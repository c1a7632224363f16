"""The HTTP API: the FastAPI app, its routes (v1, KServe v2, jobs, the page), uploads,
authentication and the one mapping of errors onto HTTP answers."""
