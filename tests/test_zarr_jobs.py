"""OME-Zarr through the job API, in process with the tiny real UNet: a volume named by path
or URL (only where the settings allow: 403 otherwise), its result an OME-Zarr store beside
the job or at a named location, downloaded zipped; TIFF uploads with format=zarr and OME-Zarr
inputs with format=tiff; and every kind of broken or lying store refused with a JSON 4xx."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tifffile
import zarr
from app_helpers import make_app, save_tiny, tiff_bytes
from app_helpers import running as running_app
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from test_jobs_api import wait_state
from zarr_helpers import em_volume, level, whole_image, write_ome_zarr

from unet_service.core.engine import Segmenter

pytestmark = pytest.mark.anyio

SHAPE = (2, 75, 61)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("zarr-jobs"))


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return em_volume(*SHAPE)


@pytest.fixture(scope="module")
def reference(weights: Path, volume: np.ndarray):
    return whole_image(Segmenter.from_weights(weights, device="cpu", backend="torch"), volume)


def app_for(weights: Path, tmp_path: Path, **overrides: object):
    values: dict[str, object] = {
        "jobs_dir": tmp_path / "jobs",
        "job_progress_s": 0.02,
        "data_roots": str(tmp_path / "data"),
        "zarr_block": 32,
    }
    return make_app(weights, **(values | overrides))


@pytest.fixture
def data(tmp_path: Path, volume: np.ndarray) -> Path:
    folder = tmp_path / "data"
    write_ome_zarr(folder / "volume.zarr", volume, version="0.4", chunks=(1, 16, 16))
    return folder


def unzipped(body: bytes, into: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        archive.extractall(into)
        (top,) = {name.split("/")[0] for name in archive.namelist()}
    return into / top


async def test_a_named_volume_gives_an_ome_zarr_labels_image(
    weights: Path, tmp_path: Path, data: Path, reference
) -> None:
    async with running_app(app_for(weights, tmp_path)) as client:
        answer = await client.post("/v1/jobs", json={"input": str(data / "volume.zarr")})
        assert answer.status_code == 202, answer.text
        job = await wait_state(client, answer.json()["id"])
        assert job["state"] == "done", job
        assert job["format"] == "zarr" and job["input"]["pages"] == SHAPE[0]
        assert job["progress"]["tiles_done"] == job["progress"]["tiles_total"] > 0
        store = Path(job["result"]["store"])
        assert store == tmp_path / "jobs" / job["id"] / "result.zarr"
        assert job["result"]["name"] == "volume_mask.zarr.zip"
        got = await client.get(job["result"]["url"])
        head = await client.head(job["result"]["url"])
    assert got.status_code == 200 and got.headers["content-type"] == "application/zip"
    assert head.status_code == 200 and head.content == b""
    assert 'filename="volume_mask.zarr.zip"' in got.headers["content-disposition"]
    downloaded = unzipped(got.content, tmp_path / "download")
    assert downloaded.name == "volume_mask.zarr"
    (node, *_) = Reader(parse_url(str(downloaded)))()
    assert node.load(Label) is not None
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    mask = np.asarray(node.data[0])
    assert np.array_equal(mask, np.stack([r.mask for r in reference]))
    attrs = json.loads((store / ".zattrs").read_text())["unet"]
    assert attrs["job"] == job["id"] and attrs["card"]["name"] == "tiny"
    assert attrs["card"]["threshold"] == pytest.approx(
        Segmenter.from_weights(weights, device="cpu").card.threshold
    )
    assert attrs["settings"]["output"] == "mask" and attrs["complete"] is True


async def test_a_form_names_the_output_location(
    weights: Path, tmp_path: Path, data: Path, reference
) -> None:
    target = data / "out" / "probabilities.zarr"
    async with running_app(app_for(weights, tmp_path)) as client:
        answer = await client.post(
            "/v1/jobs",
            params={"output": "probabilities"},
            data={"input": f"file://{data / 'volume.zarr'}", "output_location": str(target)},
        )
        assert answer.status_code == 202, answer.text
        job = await wait_state(client, answer.json()["id"])
        assert job["state"] == "done" and job["result"]["store"] == str(target)
        again = await client.post(
            "/v1/jobs", json={"input": str(data / "volume.zarr"), "output_location": str(target)}
        )
    assert again.status_code == 409 and "already exists" in again.json()["error"]
    probs = level(str(target))
    assert probs.dtype == np.float32
    expected = np.stack([r.probabilities[0] for r in reference])
    assert np.abs(probs - expected).max() <= 1e-5


async def test_an_fsspec_url_is_read_and_written_where_allowed(
    weights: Path, tmp_path: Path, volume: np.ndarray, reference
) -> None:
    source = write_ome_zarr("memory://lab/volume.zarr", volume, version="0.5", chunks=(1, 32, 32))
    settings = {"data_urls": "memory://lab"}
    try:
        async with running_app(app_for(weights, tmp_path, **settings)) as client:
            answer = await client.post(
                "/v1/jobs",
                params={"output": "instances"},
                json={"input": source, "output_location": "memory://lab/ids.zarr"},
            )
            assert answer.status_code == 202, answer.text
            job = await wait_state(client, answer.json()["id"])
            assert job["state"] == "done", job
            got = await client.get(job["result"]["url"])
            elsewhere = await client.post("/v1/jobs", json={"input": "memory://other/v.zarr"})
        ids = np.asarray(
            Reader(parse_url(str(unzipped(got.content, tmp_path))))().__next__().data[0]
        )
        assert ids.shape == SHAPE and ids.max() > 0
        assert not set(np.unique(ids[0])) - {0} & set(np.unique(ids[1]))
    finally:
        fsspec.filesystem("memory").rm("/lab", recursive=True)
    assert elsewhere.status_code == 403
    assert "UNET_DATA_URLS" in elsewhere.json()["error"]


async def test_inputs_outside_the_allowed_folders_are_refused(
    weights: Path, tmp_path: Path, data: Path
) -> None:
    outside = tmp_path / "elsewhere"
    shutil.copytree(data / "volume.zarr", outside / "volume.zarr")
    (data / "link.zarr").symlink_to(outside / "volume.zarr")
    inside = str(data / "volume.zarr")
    cases = [
        ({"input": str(outside / "volume.zarr")}, 403),
        ({"input": str(data / ".." / "elsewhere" / "volume.zarr")}, 403),
        ({"input": str(data / "link.zarr")}, 403),  # a link leading out
        ({"input": inside, "output_location": str(outside / "out.zarr")}, 403),
        ({"input": "s3://bucket/volume.zarr"}, 403),
        ({"input": "volume.zarr"}, 422),
        ({"input": inside, "colour": "x"}, 422),
        ({}, 422),
    ]
    async with running_app(app_for(weights, tmp_path)) as client:
        answers = [await client.post("/v1/jobs", json=body) for body, _ in cases]
        answers.append(await client.post("/v1/jobs", content=b"[1]", headers=_json))
        answers.append(await client.post("/v1/jobs", content=b"{not json", headers=_json))
        listed = (await client.get("/v1/jobs")).json()["jobs"]
    async with running_app(app_for(weights, tmp_path, data_roots="")) as client:
        default = await client.post("/v1/jobs", json={"input": inside})
    for answer, status in zip(answers, [s for _, s in cases] + [422, 422], strict=True):
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]
    assert "UNET_DATA_ROOTS" in answers[0].json()["error"]
    assert default.status_code == 403 and "UNET_DATA_ROOTS" in default.json()["error"]
    assert listed == [] and not (outside / "out.zarr").exists()


_json = {"content-type": "application/json"}


def broken_stores(folder: Path, volume: np.ndarray) -> dict[str, tuple[Path, int, str]]:
    """name -> (store, expected status, words of the error): stores whose metadata lies or
    is broken, each written by ome-zarr and then damaged as a disk or a tool might."""

    def fresh(name: str, version: str = "0.4", axes: str = "zyx", data=volume) -> Path:
        return Path(
            write_ome_zarr(
                folder / f"{name}.zarr",
                data,
                version=version,
                axes=axes,
                chunks=(1, 16, 16) if axes == "zyx" else None,
            )
        )

    def edit(path: Path, change) -> None:
        attrs = json.loads(path.read_text())
        change(attrs)
        path.write_text(json.dumps(attrs))

    cases: dict[str, tuple[Path, int, str]] = {}
    p = fresh("shape")  # .zattrs says y, x; the array has three dimensions
    edit(
        p / ".zattrs",
        lambda a: (
            a["multiscales"][0].update(axes=a["multiscales"][0]["axes"][1:])
            or a["multiscales"][0]["datasets"][0]["coordinateTransformations"][0].update(
                scale=[1, 1]
            )
        ),
    )
    cases["shape"] = (p, 422, "3 dimensions but the axes are (y, x)")
    p = fresh("missing")
    shutil.rmtree(p / "s0")
    cases["missing"] = (p, 422, "names the array 's0'")
    p = fresh("chunk")  # a chunk file cut short
    chunk = p / "s0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    cases["chunk"] = (p, 422, "truncated or corrupt")
    p = fresh("time", axes="tyx")
    cases["time"] = (p, 415, "axes (t, y, x)")
    p = fresh("strings")  # valid metadata, pixels of text
    zarr.open_group(str(p)).create_array("s0", shape=volume.shape, dtype=str, overwrite=True)
    cases["strings"] = (p, 415, "not a number")
    p = fresh("nometa")
    (p / ".zattrs").write_text("{}")
    cases["nometa"] = (p, 422, "no multiscales metadata")
    p = fresh("badjson")
    (p / ".zattrs").write_text("{not json")
    cases["badjson"] = (p, 422, "no Zarr group can be read")
    p = fresh("version")
    edit(p / ".zattrs", lambda a: a["multiscales"][0].update(version="0.5"))
    cases["version"] = (p, 415, "OME-Zarr 0.5 on Zarr v2")
    p = fresh("scale")
    edit(
        p / ".zattrs",
        lambda a: a["multiscales"][0]["datasets"][0].update(
            coordinateTransformations=[{"type": "scale", "scale": [1, 1]}]
        ),
    )
    cases["scale"] = (p, 422, "coordinate transformations are invalid")
    p = folder / "empty.zarr"
    p.mkdir()
    cases["empty"] = (p, 422, "no Zarr group can be read")
    p = fresh("channels", axes="cyx", data=np.stack([volume[0]] * 2))
    cases["channels"] = (p, 422, "2 channels")
    return cases


async def test_broken_or_lying_stores_are_a_json_4xx(
    weights: Path, tmp_path: Path, volume: np.ndarray
) -> None:
    cases = broken_stores(tmp_path / "data", volume)
    async with running_app(app_for(weights, tmp_path)) as client:
        answers = {
            name: await client.post("/v1/jobs", json={"input": str(store)})
            for name, (store, _, _) in cases.items()
        }
        assert (await client.get("/v1/jobs")).json()["jobs"] == []
        assert (await client.get("/v2/health/ready")).status_code == 200
    for name, (_, status, words) in cases.items():
        answer = answers[name]
        assert answer.status_code == status, (name, answer.text)
        assert words in answer.json()["error"], (name, answer.json())
        assert "Traceback" not in answer.text


async def test_a_chunk_broken_beyond_the_first_fails_the_job_with_the_reason(
    weights: Path, tmp_path: Path, data: Path
) -> None:
    chunk = data / "volume.zarr" / "s0" / "1" / "2" / "3"
    chunk.write_bytes(b"\0" * 9)
    async with running_app(app_for(weights, tmp_path)) as client:
        answer = await client.post("/v1/jobs", json={"input": str(data / "volume.zarr")})
        assert answer.status_code == 202
        job = await wait_state(client, answer.json()["id"])
        result = await client.get(f"/v1/jobs/{job['id']}/result")
    assert job["state"] == "failed", job
    assert "volume.zarr: z plane 1, rows" in job["error"]
    assert "truncated or corrupt" in job["error"]
    assert result.status_code == 409
    assert not (tmp_path / "jobs" / job["id"] / "result.zarr").exists()


async def test_formats_cross_tiff_uploads_and_zarr_inputs(
    weights: Path, tmp_path: Path, data: Path, volume: np.ndarray, reference
) -> None:
    masks = np.stack([r.mask for r in reference])
    async with running_app(app_for(weights, tmp_path)) as client:
        upload = await client.post(
            "/v1/jobs",
            params={"format": "zarr"},
            files={"file": ("stack.tif", tiff_bytes(*volume))},
        )
        named = await client.post(
            "/v1/jobs", params={"format": "tiff"}, json={"input": str(data / "volume.zarr")}
        )
        assert upload.status_code == named.status_code == 202, (upload.text, named.text)
        zarr_job = await wait_state(client, upload.json()["id"])
        tiff_job = await wait_state(client, named.json()["id"])
        as_zip = await client.get(zarr_job["result"]["url"])
        as_tiff = await client.get(tiff_job["result"]["url"])
        refused = [
            await client.post("/v1/jobs", params=p, json={"input": str(data / "volume.zarr")})
            for p in ({"tta": 8}, {"output": "overlay"}, {"format": "jpeg"})
        ]
        located = await client.post(
            "/v1/jobs",
            params={"format": "tiff"},
            json={"input": str(data / "volume.zarr"), "output_location": str(data / "o.zarr")},
        )
    assert zarr_job["result"]["name"] == "stack_mask.zarr.zip"
    downloaded = unzipped(as_zip.content, tmp_path / "unzipped")
    assert np.array_equal(
        np.asarray(Reader(parse_url(str(downloaded)))().__next__().data[0]), masks
    )
    assert tiff_job["result"]["name"] == "volume_mask.tif"
    assert np.array_equal(tifffile.imread(io.BytesIO(as_tiff.content)), masks * 255)
    assert [r.status_code for r in refused] == [422, 422, 422]
    assert "format=zarr gives" in refused[0].json()["error"]
    assert located.status_code == 422 and "output_location" in located.json()["error"]


async def test_deleting_a_running_zarr_job_removes_its_store(
    weights: Path, tmp_path: Path, data: Path
) -> None:
    from app_helpers import service_of, stepped

    app = app_for(weights, tmp_path, zarr_block=16)
    async with running_app(app) as client:
        with stepped(service_of(app)) as stepper:
            answer = await client.post("/v1/jobs", json={"input": str(data / "volume.zarr")})
            job_id = answer.json()["id"]
            await stepper.allow(3)
            store = tmp_path / "jobs" / job_id / "result.zarr"
            assert store.is_dir()
            deleted = await client.delete(f"/v1/jobs/{job_id}")
            stepper.open()
        # The runner takes one job at a time: once the next one is done, the deleted one
        # has stopped (blocks it wrote after the deletion went with its folder).
        nxt = await client.post("/v1/jobs", json={"input": str(data / "volume.zarr")})
        assert (await wait_state(client, nxt.json()["id"]))["state"] == "done"
        gone = await client.get(f"/v1/jobs/{job_id}")
    assert deleted.json() == {"id": job_id, "deleted": True, "state": "cancelled"}
    assert gone.status_code == 404 and not os.path.exists(store)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
async def test_a_result_in_the_inputs_labels_group_is_one_of_its_labels(
    weights: Path, tmp_path: Path, volume: np.ndarray, reference, version: str
) -> None:
    image = write_ome_zarr(
        tmp_path / "data" / "v.zarr", volume, version=version, chunks=(1, 16, 16)
    )
    async with running_app(app_for(weights, tmp_path)) as client:
        answer = await client.post(
            "/v1/jobs", json={"input": image, "output_location": f"{image}/labels/mask"}
        )
        assert answer.status_code == 202, answer.text
        job = await wait_state(client, answer.json()["id"])
    assert job["state"] == "done", job
    # ome-zarr's reader (napari's) finds the mask as a labels layer of the image.
    nodes = list(Reader(parse_url(image))())
    (label,) = [node for node in nodes if node.load(Label) is not None]
    assert "v.zarr/labels/mask" in str(label.zarr)
    assert np.array_equal(np.asarray(label.data[0]), np.stack([r.mask for r in reference]))
    assert [a["name"] for a in label.metadata["axes"]] == ["z", "y", "x"]
    from ome_zarr.writer import get_metadata

    assert get_metadata(zarr.open_group(f"{image}/labels", mode="r"))["labels"] == ["mask"]
    mask = get_metadata(zarr.open_group(f"{image}/labels/mask", mode="r"))
    assert mask["image-label"]["source"] == {"image": "../../"}
