"""The most threads a user may ask for, per kind, and the longest duration: documented numbers, not this
machine's (the launcher of a Dataflow job is not its worker). Kept apart from the modules that use them so
that the options (and the Flex Template's metadata, built without PyAV) import nothing heavy."""

__all__ = ["MAX_DECODE_THREADS", "MAX_ENCODER_THREADS", "MAX_LOCAL_WORKERS", "MAX_SECONDS"]

MAX_LOCAL_WORKERS = 1024
"""The most worker threads ``--local-workers`` gives a local run: above the core count of any one machine
(the largest cloud VMs have under 1000 vCPUs), and each thread holds a clip's decode and frames in memory.
A documented number, not this machine's cores: the launcher of a Dataflow job is not its worker."""

MAX_DECODE_THREADS = 64
"""The most decoder threads a clip gets (``--decode-threads`` above it is refused; the decoder caps what
it is given): FFmpeg starts every thread it is told to, and more than a few dozen never decode faster
(frame threading waits on references)."""

MAX_ENCODER_THREADS = 64
"""The most encoder threads a preview may ask for (``--preview-num-cpus-per-worker``). FFmpeg 8.1's libwebp
wrapper encodes on one thread whatever it is told (500 asked start none), but an encoder that honours the
count starts every thread asked, and a preview is a few small frames (a minute at 1 fps is 60)."""

MAX_SECONDS = 10**8
"""The longest duration a ``--*-seconds`` flag takes (about 3 years; above it the value is refused). Far past
any wait a run needs, and every wait made from one stays below the longest a thread can wait
(``threading.TIMEOUT_MAX``, about 292 years on Linux: above it a wait raises ``OverflowError``): a window's
time limit is at most six request timeouts plus the engine's starts."""
