"""Serving: the tile batcher that owns the device, the queue entries, the service's
lifecycle and limits, and its Prometheus metrics."""
