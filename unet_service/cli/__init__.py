"""The command lines: `unet-predict` and `unet-serve`."""
