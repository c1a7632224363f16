"""UNet segmentation service: exact overlap-tile inference of a valid-convolution U-Net,
served over HTTP (v1, KServe v2, section jobs) and from the command line.

Subpackages: `core` (network, geometry, tile plans, runner, weights, precision), `imaging`
(image input and output), `pipeline` (one image's tiles, stitching and outputs), `serving`
(the tile batcher and the service's lifecycle), `api` (the FastAPI app), `jobs` (section
jobs: worker, files, table), `cli` (unet-predict, unet-serve), `training` (unet-train,
unet-eval). No `__init__` imports anything heavy."""
