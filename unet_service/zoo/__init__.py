"""BioImage Model Zoo packages served beside our own models."""
