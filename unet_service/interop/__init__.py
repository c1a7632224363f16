"""The service's weights in other ecosystems' formats: a BioImage Model Zoo package
(`unet-export bioimageio`)."""
