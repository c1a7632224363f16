"""Whether two builds of the service give the same answers, byte for byte: masks,
probabilities, instances and overlays of an image and of a stack, test-time augmentation, a v2
request, refusals of bad uploads, and section jobs' result files. For a change that must not
change behaviour (a refactoring): run it with the earlier checkout's `unet-serve`.

    .venv/bin/python -m bench.same_answers OTHER_VENV/bin/unet-serve [--weights W]

Prints one row per case (identical, or how the two differ) and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image

from bench.load import Server, free_port
from bench.workload import isbi_slices
from unet_service.options import DEFAULT_WEIGHTS

# (name, path, params, upload kind)
CASES = [
    ("mask", "/v1/segment", {}, "png"),
    ("probabilities", "/v1/segment", {"output": "probabilities"}, "png"),
    ("instances", "/v1/segment", {"output": "instances"}, "png"),
    ("overlay", "/v1/segment", {"output": "overlay"}, "png"),
    ("overlay by cell", "/v1/segment", {"output": "overlay", "colour": "instances"}, "png"),
    ("tta=8 mask", "/v1/segment", {"tta": "8"}, "png"),
    ("16-bit TIFF mask", "/v1/segment", {}, "tiff16"),
    ("stack mask", "/v1/segment", {}, "stack"),
    ("stack probabilities", "/v1/segment", {"output": "probabilities"}, "stack"),
    ("stack instances", "/v1/segment", {"output": "instances"}, "stack"),
    ("stack overlay", "/v1/segment", {"output": "overlay"}, "stack"),
    ("text upload", "/v1/segment", {}, "text"),
    ("truncated PNG", "/v1/segment", {}, "truncated"),
]
JOBS = [
    ("job mask", {"output": "mask"}),
    ("job probabilities", {"output": "probabilities"}),
    ("job instances", {"output": "instances"}),
    ("job overlay", {"output": "overlay"}),
    ("job tta=8", {"output": "mask", "tta": "8"}),
]


def uploads() -> dict[str, bytes]:
    slices = isbi_slices()[:3]

    def png(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    def tiff(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        tifffile.imwrite(buf, array, photometric="minisblack")
        return buf.getvalue()

    crops = [s[:300, :280] for s in slices]
    return {
        "png": png(slices[0]),
        "tiff16": tiff(slices[1].astype(np.uint16) * 257),
        "stack": tiff(np.stack(crops)),
        "text": b"hello, I am text\n",
        "truncated": png(slices[0])[:300],
    }


def answers(exe: Path, weights: Path, data: dict[str, bytes], jobs_dir: Path) -> dict[str, bytes]:
    port = free_port()
    env = {
        "UNET_WEIGHTS": str(weights),
        "UNET_PORT": str(port),
        "UNET_HOST": "127.0.0.1",
        "UNET_LOG_LEVEL": "warning",
        "UNET_JOBS_DIR": str(jobs_dir),
        "UNET_JOB_PROGRESS_S": "0.1",
    }
    got: dict[str, bytes] = {}
    with (
        Server([str(exe)], env, port, "/v2/health/ready") as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        for name, path, params, kind in CASES:
            r = client.post(path, params=params, files={"file": ("upload", data[kind])})
            got[name] = f"{r.status_code} {r.headers['content-type']}\n".encode() + r.content
        pixels = isbi_slices()[0][:64, :80]
        tensor = {"name": "image", "shape": list(pixels.shape), "datatype": "UINT8"}
        body = {"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}
        r = client.post("/v2/models/isbi2012/infer", json=body)
        got["v2 mask + probabilities"] = r.content
        for name, params in JOBS:
            files = {"file": ("stack.tif", data["stack"])}
            job = client.post("/v1/jobs", params=params, files=files).json()
            while job["state"] in ("queued", "running"):
                time.sleep(0.05)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            result = client.get(f"/v1/jobs/{job['id']}/result")
            got[name] = f"{job['state']}\n".encode() + result.content
    return got


def differs(a: bytes, b: bytes) -> str:
    if a == b:
        return "identical"
    try:
        return f"differ: {json.loads(a)} vs {json.loads(b)}"
    except ValueError:
        return f"differ ({len(a)} vs {len(b)} bytes)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.same_answers", description=__doc__)
    p.add_argument("other", type=Path, help="the other build's unet-serve")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    args = p.parse_args(argv)
    data = uploads()
    ours = Path(sys.executable).parent / "unet-serve"
    with tempfile.TemporaryDirectory() as tmp:
        a = answers(ours, args.weights, data, Path(tmp) / "a")
        b = answers(args.other, args.weights, data, Path(tmp) / "b")
    print("| case | answers |")
    print("| --- | --- |")
    for name in a:
        print(f"| {name} | {differs(a[name], b[name])} |")
    return 0 if a == b else 1


if __name__ == "__main__":
    sys.exit(main())
