"""The training wing: UNet training (`unet-train`), evaluation (`unet-eval`) and the model
card's figure, on labelled image folders. It builds on the inference core (`model`), never
the other way round, and needs the `train` extra (`pip install ".[train]"`)."""

import importlib.util

# The serving install leaves the extra out; say how to get it rather than fail deep inside
# an augmentation or a score with a bare "No module named 'scipy'".
if importlib.util.find_spec("scipy") is None:
    raise ModuleNotFoundError(
        'unet-train and unet-eval need the train extra: pip install ".[train]"', name="scipy"
    )
