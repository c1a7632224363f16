"""A TIFF's chain of pages (IFDs, each pointing at the next), walked one header at a time by
both readers of stacks: `imaging.pages` (requests, decoded in memory) and
`imaging.sources` (jobs, read by window from disk). One walk, one verdict: a chain that
loops back or ends in an offset past the end of the file is a truncated or corrupt file, an
error, never a shorter stack.

tifffile reports a chain that points past the end of the file, or a header it cannot parse,
as a log line and then simply returns fewer pages; so the walk listens to its log, and also
reads the last page's next-page offset from the bytes, which finds the cut whatever the
logging configuration lets through."""

from __future__ import annotations

import logging
import struct
import threading

import tifffile

from unet_service.imaging.decode import CorruptImageError


class _TiffComplaints(logging.Handler):
    """Collects what tifffile logs as errors in this thread about the chain of pages (other
    complaints, an odd tag say, are harmless)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.thread == self.thread and "TiffPages" in message:
            self.messages.append(message)


class PageChain:
    """One walk along a TIFF's pages, in a `with` block that spans opening the file and the
    walk (tifffile complains while it parses): `visit` each page as it is reached, then
    `check_end` with the last one."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._complaints = _TiffComplaints()

    def __enter__(self) -> PageChain:
        logging.getLogger("tifffile").addHandler(self._complaints)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tifffile").removeHandler(self._complaints)

    def visit(self, page: tifffile.TiffPage, number: int) -> None:
        """Page `number` (from 1) is reached: a header seen before means a loop, which
        tifffile's iterator would follow forever."""
        if page.offset in self._seen:
            raise CorruptImageError(f"the TIFF's chain of pages loops at page {number}")
        self._seen.add(page.offset)

    def check_end(self, tif: tifffile.TiffFile, last: tifffile.TiffPage, pages: int) -> None:
        """The walk stopped after `last`, having found `pages` pages: the chain must really
        end there."""
        messages = self._complaints.messages
        if messages or next_page_offset(tif, last) != 0:
            said = f" ({messages[0]})" if messages else ""
            raise CorruptImageError(
                f"the TIFF is truncated or corrupt after page {pages}: its chain of pages "
                f"points past the end of the file{said}"
            )


def next_page_offset(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> int:
    """Where the chain goes after `page`, read from the file itself: 0 where it ends, -1
    when the header is cut off before its next-page offset."""
    fmt = tif.tiff
    fh = tif.filehandle
    with fh.lock:
        fh.seek(page.offset)
        count = fh.read(fmt.tagnosize)
        if len(count) < fmt.tagnosize:
            return -1
        (entries,) = struct.unpack(fmt.tagnoformat, count)
        fh.seek(page.offset + fmt.tagnosize + entries * fmt.tagsize)
        offset = fh.read(fmt.offsetsize)
    if len(offset) < fmt.offsetsize:
        return -1
    return struct.unpack(fmt.offsetformat, offset)[0]
