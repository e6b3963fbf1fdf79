"""A window's frames into a shared engine's process through shared memory, not pickled through the proxy.

With ``--share-model-across-processes`` every SDK process sends its windows to the one ``WindowServer`` of
the machine through Beam's proxy, which pickles each call. A window's frames (tens of MB) would be pickled,
sent over a socket, received into a buffer and unpickled into the engine's process: four copies, and
receive buffers that glibc keeps (P12). Here the sender (``lend``) copies the frames once into a named
shared-memory block and sends the window with ``frames`` replaced by a ``SharedFrames`` reference (name,
shape, dtype); the engine's side (``receive``) maps the block and hands the handler a numpy view of it, no
copy. The sender unlinks the block when the call is back, however it ended; a sender killed meanwhile
leaves it to its ``multiprocessing`` resource tracker, which unlinks the blocks its process still had.

Linux (``/dev/shm``). Where a block cannot be made (no ``/dev/shm``, or too little room left in it:
the block is allocated up front, so a full ``/dev/shm`` is an error here, never a SIGBUS later), the
window is pickled as before. ``BEAM_CAPTIONS_SHARED_FRAMES=0`` turns this off (benchmarks compare both).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

if TYPE_CHECKING:
    from beam_captions.records import WindowRecord

__all__ = ["SWITCH", "SharedFrames", "block_prefix", "lend", "receive"]

log = logging.getLogger(__name__)

SWITCH = "BEAM_CAPTIONS_SHARED_FRAMES"
"""The environment variable that turns shared frames off (``0``) in a sending process."""

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"beam_captions_[0-9]+_[0-9a-f]+")
_warned = False


def block_prefix(pid: Optional[int] = None) -> str:
    """The start of the names of the blocks that process ``pid`` (default: this one) lends."""
    return f"beam_captions_{os.getpid() if pid is None else pid}_"


@dataclass(frozen=True)
class SharedFrames:
    """What crosses the proxy in place of a window's frames: the block that holds them, and their layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _block(frames: np.ndarray) -> Optional[shared_memory.SharedMemory]:
    """A new block holding a copy of ``frames``; None where none can be made (the window is pickled then)."""
    global _warned
    block = None
    try:
        block = shared_memory.SharedMemory(block_prefix() + secrets.token_hex(8), create=True, size=frames.nbytes)
        descriptor = os.open(os.path.join(SHM_DIR, block.name), os.O_RDWR)
        try:  # allocate it now: writing to a block /dev/shm has no room for is a SIGBUS
            os.posix_fallocate(descriptor, 0, frames.nbytes)
        finally:
            os.close(descriptor)
        np.copyto(np.ndarray(frames.shape, frames.dtype, buffer=block.buf), frames)
        return block
    except OSError as error:
        if block is not None:
            block.close()
            block.unlink()
        if not _warned:
            _warned = True
            log.warning("window frames go to the shared engine pickled: no shared-memory block of %d bytes "
                        "(%s); is %s too small?", frames.nbytes, error, SHM_DIR)
        return None


def lend(window: "WindowRecord", send: Callable[["WindowRecord"], "WindowRecord"]) -> "WindowRecord":
    """``send(window)``'s outcome, the window's frames lent through a shared-memory block (unlinked when
    ``send`` returns or raises). An outcome that comes back with the reference gets the frames back."""
    frames = window.frames
    if (os.environ.get(SWITCH, "1") == "0" or not isinstance(frames, np.ndarray) or frames.dtype.hasobject
            or frames.nbytes == 0 or not os.path.isdir(SHM_DIR)):
        return send(window)
    block = _block(frames)
    if block is None:
        return send(window)
    reference = SharedFrames(block.name, tuple(frames.shape), frames.dtype.str)
    try:
        outcome = send(window.replace(frames=reference))
    finally:
        block.close()
        block.unlink()
    return outcome.replace(frames=frames) if isinstance(outcome.frames, SharedFrames) else outcome


def receive(window: "WindowRecord", serve: Callable[["WindowRecord"], "WindowRecord"]) -> "WindowRecord":
    """``serve(window)`` with lent frames (a ``SharedFrames``) mapped as a numpy view, not copied. An outcome
    that keeps that view goes back with the reference instead (no frames cross back)."""
    reference = window.frames
    if not isinstance(reference, SharedFrames):
        return serve(window)
    if not _NAME.fullmatch(reference.name):
        raise ValueError(f"not a block of lent frames: {reference.name!r}")
    descriptor = os.open(os.path.join(SHM_DIR, reference.name), os.O_RDWR)
    try:  # shared, so that reading it maps the sender's pages (populated at once: no fault per page)
        mapping = mmap.mmap(descriptor, reference.nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(descriptor)
    try:
        view = np.frombuffer(mapping, reference.dtype).reshape(reference.shape)
        outcome = serve(window.replace(frames=view))
        return outcome.replace(frames=reference) if outcome.frames is view else outcome
    finally:
        view = outcome = None  # noqa: F841 - the view's export must go before the mapping can close
        try:
            mapping.close()
        except BufferError:  # something still holds the view (a request that timed out): unmapped when it goes
            pass
