"""Image input and output, torch-free: decoding uploads, reading TIFFs by window,
writing TIFF results, encoding responses, and rendering images for display."""
