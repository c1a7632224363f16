"""The training wing: UNet training (`unet-train`), evaluation (`unet-eval`) and the model
card's figure, on labelled image folders. It builds on the inference core (`model`), never
the other way round, and needs the `train` extra (`pip install ".[train]"`)."""
