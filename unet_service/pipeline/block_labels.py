"""Cell instances over a volume computed block by block: each block's watershed numbers its
cells 1.. (`pipeline.blocks`); this one pass makes the ids unique over the volume and joins
the two halves of a cell cut by a block's border.

Each block labels its cells with a halo of context around it, so both sides of a border see
a cell that crosses it alike. Two ids facing each other across a border are one cell when
each is the other's best match there: of the border pixels of one, most face the other, and
the other way round. A cell that merely touches a neighbouring cell at the border shares a
few pixels with it, the cell's own other half most of them. The ids so joined are numbered
1..N over the volume (block order, then id order) into a map of every block-local id, kept
in the store before any block is rewritten with it, so an interrupted pass resumes where it
stopped and never maps an id twice.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from unet_service.imaging.zarr_result import ZarrResult
from unet_service.pipeline.volume import Volume

LABEL_MAP = "label_map"
RELABELLED = "relabelled"


def _facing(volume: Volume, result: ZarrResult, a: int, b: int, axis: str) -> np.ndarray:
    """(n, 2) ids of block `a` and of block `b` at the pixels facing each other across
    their border (both cells), block-local."""
    ra, rb = volume.region(a), volume.region(b)
    if axis == "y":
        last = result.read(ra.z0, ra.z1, slice(ra.y1 - 1, ra.y1), slice(ra.x0, ra.x1))
        first = result.read(rb.z0, rb.z1, slice(rb.y0, rb.y0 + 1), slice(rb.x0, rb.x1))
    else:
        last = result.read(ra.z0, ra.z1, slice(ra.y0, ra.y1), slice(ra.x1 - 1, ra.x1))
        first = result.read(rb.z0, rb.z1, slice(rb.y0, rb.y1), slice(rb.x0, rb.x0 + 1))
    both = (last > 0) & (first > 0)
    return np.stack([last[both], first[both]], axis=1).astype(np.int64)


def mutual_best(pairs: np.ndarray) -> np.ndarray:
    """(n, 2) facing ids, one row per pixel -> the (m, 2) distinct pairs in which each is the
    other's most frequent partner."""
    if len(pairs) == 0:
        return pairs
    distinct, counts = np.unique(pairs, axis=0, return_counts=True)

    def best(side: int) -> set[tuple[int, int]]:
        # Most frequent first, then keep each id's first row.
        order = np.lexsort((-counts, distinct[:, side]))
        ids = distinct[order, side]
        first = np.ones(len(ids), bool)
        first[1:] = ids[1:] != ids[:-1]
        return {tuple(row) for row in distinct[order][first].tolist()}

    return np.array(sorted(best(0) & best(1)), np.int64).reshape(-1, 2)


def label_map(volume: Volume, result: ZarrResult) -> np.ndarray:
    """The final id of every block-local id, indexed by the block's offset plus the id (0:
    background), as a uint32 array (blocking)."""
    counts = result.block_labels()
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    if total >= 2**32 - 1:
        raise ValueError(f"{total} cells are more than 32-bit cell ids can number")
    edges = [np.zeros((0, 2), np.int64)]
    for a, b, axis in volume.borders():
        matched = mutual_best(_facing(volume, result, a, b, axis))
        edges.append(matched + np.array([offsets[a], offsets[b]]))
    joined = np.concatenate(edges)
    graph = coo_matrix(
        (np.ones(len(joined), np.int8), (joined[:, 0], joined[:, 1])), shape=(total + 1,) * 2
    )
    # Components are numbered in the order of their first id, so background (id 0, never
    # joined) stays 0 and cells keep the blocks' order.
    _, components = connected_components(graph, directed=False)
    return components.astype(np.uint32)


def relabel(volume: Volume, result: ZarrResult) -> int:
    """Every block of `result` rewritten with final ids (blocking); returns the cells."""
    books = result.books
    if LABEL_MAP not in books:
        mapping = label_map(volume, result)
        books.create_array(RELABELLED, shape=(len(volume),), chunks=(1,), dtype="uint8")
        books.create_array(LABEL_MAP, data=mapping, chunks=(min(len(mapping), 1 << 20),))
    mapping = np.asarray(books[LABEL_MAP][:])
    done = np.asarray(books[RELABELLED][:])
    offsets = np.concatenate([[0], np.cumsum(result.block_labels())])
    for index in range(len(volume)):
        if done[index]:
            continue
        r = volume.region(index)
        local = result.read(r.z0, r.z1, slice(r.y0, r.y1), slice(r.x0, r.x1))
        final = np.where(local > 0, mapping[local + offsets[index]], 0).astype(np.uint32)
        result.write(r.z0, r.y0, r.x0, final)
        books[RELABELLED][index] = 1
    return int(mapping.max(initial=0))
