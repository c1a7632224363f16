"""A section's result written as it is stitched: a tiled, compressed TIFF volume (one page per
input page, one series with ImageJ metadata: imaging.tiff_volume), fed rows in order and never
holding a whole page.

tifffile's `TiffWriter.write` accepts an iterator of tiles and writes each as it comes (its
offsets go into the IFDs afterwards), so a thread runs one `write` for all pages over an
iterator that takes the stitched rows from a queue and cuts them into TIFF tiles. The
producer (`write_rows`, from the stitching side) never blocks: it only queues;
`wait_for_room` is the backpressure, called by whoever produces the next rows (the tile
cutter, in the inference thread, so the service's event loop never waits for the disk).

Failures: an error in the thread (disk full, ...) is raised by the next `write_rows`,
`wait_for_room` or `close`; `abort` (and leaving the `with` block by an exception) stops the
thread and deletes the file, so no half-written file is left looking complete.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from unet_service.imaging.tiff_volume import Volume, open_volume, write_volume

TIFF_TILE = 256
# Queued rows beyond which `wait_for_room` waits for the writer. None: the next tile is cut
# only once the writer has taken every band queued so far, so at most the band it is
# compressing and one more wait; it compresses a band far faster than the network makes one.
DEFAULT_BACKLOG_ROWS = 0

_ABORT = object()


class WriterError(RuntimeError):
    """The result file could not be written."""


def needs_bigtiff(pages: int, height: int, width: int, samples: int, dtype: np.dtype) -> bool:
    """Whether a result of this shape may exceed a classic TIFF's 4 GiB."""
    return Volume(pages, height, width, dtype, samples).needs_bigtiff()


class SectionWriter:
    """Writes `pages` pages of height x width (x samples) `dtype` pixels (RGB colour with
    `rgb`) to `path` as a tiled, deflate-compressed TIFF volume (BigTIFF when `bigtiff`,
    default: when the size needs it). Rows arrive in order through `write_rows`, page after
    page; `close` finishes the file."""

    def __init__(
        self,
        path: str | Path,
        *,
        pages: int,
        height: int,
        width: int,
        dtype: np.dtype | type,
        samples: int = 1,
        rgb: bool = False,
        bigtiff: bool | None = None,
        tile: int = TIFF_TILE,
        backlog_rows: int = DEFAULT_BACKLOG_ROWS,
    ) -> None:
        self.path = Path(path)
        self.pages, self.height, self.width, self.samples = pages, height, width, samples
        self.volume = Volume(pages, height, width, np.dtype(dtype), samples, rgb)
        self.dtype = self.volume.dtype
        self.tile = tile
        self.backlog_rows = backlog_rows
        self.rows_written = 0  # rows handed to write_rows, all pages
        self.rows_taken = 0  # rows the thread has taken from the queue
        self.rows_done = 0  # rows the thread has cut into TIFF tiles and written
        self.max_buffered_rows = 0  # most rows queued or held by the thread at once (tests)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._aborted = False
        self._tiff = open_volume(self.path, self.volume, bigtiff)
        self._thread = threading.Thread(target=self._run, name="section-writer", daemon=True)
        self._thread.start()

    @property
    def total_rows(self) -> int:
        return self.pages * self.height

    # ----- producer side -----------------------------------------------------------------------

    def write_rows(self, rows: np.ndarray) -> None:
        """Queue the next (h, width) or (h, width, samples) rows; never waits."""
        self._raise_error()
        if self._closed:
            raise WriterError("the writer is closed")
        shape = (self.width,) if self.samples == 1 else (self.width, self.samples)
        if rows.shape[1:] not in (shape, (self.width, self.samples)):
            raise ValueError(f"rows must be (h, {', '.join(map(str, shape))}), got {rows.shape}")
        if self.rows_written + len(rows) > self.total_rows:
            raise ValueError("more rows than the pages hold")
        rows = rows.reshape(len(rows), self.width, self.samples).astype(self.dtype, copy=False)
        with self._room:
            self.rows_written += len(rows)
            buffered = self.rows_written - self.rows_done
            self.max_buffered_rows = max(self.max_buffered_rows, buffered)
        self._queue.put(rows)

    @property
    def backlog(self) -> int:
        """Rows queued that the thread has not taken yet. (Rows it has taken but not written
        are fewer than a TIFF tile's: it waits for more to complete a row of tiles, so
        waiting for those would never end.)"""
        return self.rows_written - self.rows_taken

    def wait_for_room(self) -> None:
        """Wait while more than `backlog_rows` queued rows wait for the thread (raises the
        writer's error, if it failed)."""
        with self._room:
            self._room.wait_for(lambda: self.backlog <= self.backlog_rows or not self.alive)
        self._raise_error()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Wait for every row to be written and finish the file. Raises WriterError (and
        deletes the file) when rows are missing or the thread failed; a no-op after abort."""
        if self._aborted:
            return
        if self._closed:
            self._raise_error()
            return
        if self.rows_written < self.total_rows:
            self.abort()
            raise WriterError(
                f"only {self.rows_written} of {self.total_rows} result rows were produced"
            )
        self._closed = True
        self._thread.join()
        if self._error is not None:
            self._delete()
        self._raise_error()

    def abort(self) -> None:
        """Stop writing and delete the file (safe to call more than once, and after close)."""
        self._aborted = True
        if not self._closed:
            self._closed = True
            self._queue.put(_ABORT)
            self._thread.join()
        self._delete()

    def __enter__(self) -> SectionWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise WriterError(f"writing {self.path.name} failed: {self._error}") from self._error

    def _delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # ----- the writing thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with self._tiff as tif:
                write_volume(tif, self._tiles(), self.volume, tile=self.tile)
        except BaseException as e:  # reported to the producer; the file is deleted
            self._error = e
        finally:
            with self._room:
                self._room.notify_all()

    def _tiles(self) -> Iterator[np.ndarray]:
        """Every page's TIFF tiles, page by page and row of tiles by row of tiles, from the
        queued rows."""
        for _ in range(self.pages):
            yield from self._page_tiles()

    def _page_tiles(self) -> Iterator[np.ndarray]:
        held: list[np.ndarray] = []
        have = 0
        for top in range(0, self.height, self.tile):
            want = min(self.tile, self.height - top)
            while have < want:
                item = self._queue.get()
                if item is _ABORT:
                    raise WriterError("aborted")
                assert isinstance(item, np.ndarray)
                held.append(item)
                have += len(item)
                with self._room:
                    self.rows_taken += len(item)
                    self._room.notify_all()
            block = np.concatenate(held) if len(held) > 1 else held[0]
            rows, rest = block[:want], block[want:]
            held, have = ([rest], len(rest)) if len(rest) else ([], 0)
            for left in range(0, self.width, self.tile):
                tile = rows[:, left : left + self.tile]
                yield tile if self.samples > 1 else tile[..., 0]
            with self._room:
                self.rows_done += want
        if have:
            raise WriterError("rows beyond the page's height")
