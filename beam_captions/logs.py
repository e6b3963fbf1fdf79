"""Where a run's logs go: quiet terminal, everything in a log file.

By default the terminal shows the progress line, this package's own warnings (those that repeat per
clip are counted and summarised once per kind at the end, see ``warn``), errors in one line and the
summary. Every log record (this package's, vLLM's, transformers', torch's, Beam's, Python warnings) goes to
the log file: ``OUT/logs/beam-captions-<UTC time>-<pid>.log`` for a local output, the path given with
``--log-file`` otherwise (for a ``gs://`` output without one, a file under the temporary folder, copied
to ``OUT/logs/`` at the end). ``--verbose`` shows the library logs on the terminal too.

vLLM configures its own handlers (to stdout) in every process it starts, the engine core included, from
environment variables read when it is imported; ``setup_logging`` sets them (``VLLM_LOGGING_CONFIG_PATH``,
a logging config that writes to the log file) before any engine starts, so its child processes follow.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, TextIO

__all__ = [
    "LogSetup", "WARNING_KINDS", "default_log_path", "engine_output_to_log", "held_for_log_file", "route_transformers",
    "setup_logging", "terminal", "warn",
]

log = logging.getLogger("beam_captions")

FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s"

# Warnings that can repeat once per clip: counted, told once in the summary (the file has each one).
WARNING_KINDS = {
    "preview_height": "clips below the preview height",
    "preview_fps": "clips below the preview frame rate",
    "undecodable_packets": "clips with packets that could not be decoded",
    "demux_error": "clips whose reading stopped at a demux error",
    "decoded_twice": "clips decoded twice (frame count differs from packet count)",
    "lost_frames": "clips with frames that could not be decoded",
}


def warn(kind: str, message: str, *args, logger: Optional[logging.Logger] = None) -> None:
    """A warning that may repeat per clip: counted under ``warnings_<kind>`` (the summary tells each kind
    once) and logged as a warning that only the log file shows (and the terminal with --verbose)."""
    from beam_captions.metrics import count

    count(f"warnings_{kind}")
    (logger or log).warning(message, *args, extra={SUMMARISED: kind})


SUMMARISED = "beam_captions_summarised"


def default_log_path(output: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"beam-captions-{stamp}-{os.getpid()}.log"
    from beam_captions.io.paths import is_local, local_path

    if is_local(output):
        return os.path.join(local_path(output), "logs", name)
    return os.path.join(tempfile.gettempdir(), "beam-captions-logs", name)


_TERMINALS = tuple(stream for stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if stream)


class _Terminal(logging.Filter):
    """Without --verbose: this package's warnings and errors only (libraries go to the file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, SUMMARISED, None):  # told once per kind in the summary
            return False
        return record.name == "beam_captions" or record.name.startswith("beam_captions.")


@dataclass
class LogSetup:
    path: str
    verbose: bool
    handlers: tuple[logging.Handler, ...]
    copy_to: Optional[str] = None  # where the file goes at the end (a gs:// output)
    vllm_config: Optional[str] = None
    environ: Optional[dict[str, Optional[str]]] = None  # the variables set here, with their values before
    root_level: int = logging.WARNING
    displaced: tuple[logging.Handler, ...] = ()
    terminal: Optional[TextIO] = None
    saved_stderr: Optional[TextIO] = None  # ``sys.stderr`` before the run pointed it at the log file

    def close(self, stopping: bool = False) -> None:
        """Undo the set-up. ``stopping`` (a signal stopped the run; the process ends next): what runner
        threads still print while it ends is dropped rather than shown on the terminal."""
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        for name, value in (self.environ or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self.vllm_config:
            with contextlib.suppress(OSError):
                os.unlink(self.vllm_config)
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(self.root_level)
        for handler in () if stopping else self.displaced:  # a displaced handler would print to the terminal
            root.addHandler(handler)
        if not root.handlers:  # runner threads still draining after a stop must not print raw tracebacks
            root.addHandler(logging.NullHandler())
        logging.captureWarnings(False)
        own_terminal = self.terminal is not None and self.terminal is not (self.saved_stderr or sys.stderr)
        if self.saved_stderr is not None:
            stray, sys.stderr = sys.stderr, (open(os.devnull, "w") if stopping else self.saved_stderr)
            with contextlib.suppress(Exception):
                stray.close()
        if own_terminal:  # the copy of descriptor 2 made for the run, not the stream it copied
            with contextlib.suppress(Exception):
                self.terminal.close()
        if self.copy_to:
            try:
                from beam_captions.io.files import write_bytes

                with open(self.path, "rb") as handle:
                    write_bytes(self.copy_to, handle.read(), "text/plain")
            except Exception as error:  # noqa: BLE001 - the log stays where it was written
                print(f"beam-captions: the log file stays at {self.path} ({error})", file=sys.stderr)


def _vllm_config(path: str, verbose: bool, folder: str) -> str:
    handlers = {
        "file": {"class": "logging.FileHandler", "filename": path, "mode": "a", "encoding": "utf-8",
                 "formatter": "plain", "level": "INFO"},
    }
    if verbose:
        handlers["terminal"] = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "plain", "level": "INFO"}
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": handlers,
        "loggers": {"vllm": {"handlers": list(handlers), "level": "INFO", "propagate": False}},
    }
    config_path = os.path.join(folder, f".vllm-logging-{os.getpid()}.json")
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return config_path


def setup_logging(output: str, log_file: Optional[str] = None, verbose: bool = False) -> LogSetup:
    """Send every log record to the log file and, quietly (or all with ``verbose``), to the terminal."""
    path = os.path.abspath(log_file or default_log_path(output))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    copy_to = None
    from beam_captions.transforms.read import is_local

    if log_file is None and not is_local(output):
        from apache_beam.io.filesystems import FileSystems

        copy_to = FileSystems.join(output, "logs", os.path.basename(path))
    root = logging.getLogger()
    displaced = []
    for handler in list(root.handlers):
        if getattr(handler, "_beam_captions", False):  # an earlier run's in this process
            root.removeHandler(handler)
        elif type(handler) is logging.StreamHandler and handler.stream in _TERMINALS:
            # logging.basicConfig's (a library logged before any handler was set): ours replace it
            root.removeHandler(handler)
            displaced.append(handler)
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    stream = _terminal_stream(verbose)
    terminal = logging.StreamHandler(stream)
    terminal.setFormatter(logging.Formatter("beam-captions: %(levelname)s: %(message)s" if not verbose else FORMAT))
    if verbose:
        terminal.setLevel(logging.INFO)
    else:
        terminal.setLevel(logging.WARNING)
        terminal.addFilter(_Terminal())
    for handler in (file_handler, terminal):
        handler._beam_captions = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    while _HELD:  # logged before this set-up, while the flags were checked (held_for_log_file)
        root.handle(_HELD.popleft())
    # vLLM (this process and the engine processes it starts): to the same file.
    vllm_config = _vllm_config(path, verbose, folder)
    settings = {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_LEVEL": "INFO", "VLLM_LOGGING_CONFIG_PATH": vllm_config}
    if not verbose:  # engine processes have no handler of ours: only their errors reach the terminal
        settings.update({"TRANSFORMERS_VERBOSITY": "error", "TORCH_CPP_LOG_LEVEL": "ERROR"})
    environ = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    route_transformers()
    saved_stderr = None
    if not verbose:  # what libraries print to sys.stderr themselves (Beam's worker prints tracebacks) goes to the file
        saved_stderr, sys.stderr = sys.stderr, open(path, "a", encoding="utf-8", errors="replace", buffering=1)
    global _ACTIVE
    _ACTIVE = LogSetup(path, verbose, (file_handler, terminal), copy_to, vllm_config, environ, level,
                       tuple(displaced), stream, saved_stderr)
    return _ACTIVE


def _terminal_stream(verbose: bool) -> TextIO:
    """Where the terminal's lines go: a copy of file descriptor 2, untouched while ``engine_output_to_log``
    points descriptor 2 at the log file."""
    if verbose:
        return sys.stderr
    try:
        sys.stderr.flush()
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):  # no real descriptor (a test's captured stream)
        return sys.stderr
    return stream


def log_path() -> Optional[str]:
    """The run's log file, if logging is set up."""
    return _ACTIVE.path if _ACTIVE is not None else None


def restore_terminal() -> None:
    """Point descriptors 1 and 2 at the terminal again, even while an engine is starting: a stop's line
    and the summary must reach the user. The engine's processes keep the log file they inherited."""
    with _REDIRECT_LOCK:
        if _REDIRECTS["depth"] > 0:
            _point_descriptors_at(*_REDIRECTS["saved"])


def _point_descriptors_at(out: int, err: int) -> None:
    """Flush Python's streams, then make descriptors 1 and 2 copies of ``out`` and ``err``."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(out, 1)
    os.dup2(err, 2)


def terminal() -> TextIO:
    """The stream for the progress line and our warnings (see ``_terminal_stream``)."""
    return _ACTIVE.terminal if _ACTIVE is not None and _ACTIVE.terminal is not None else sys.stderr


_ACTIVE: Optional[LogSetup] = None
_HELD: collections.deque[logging.LogRecord] = collections.deque(maxlen=100)


class _Hold(logging.Handler):
    """Keeps each record for ``setup_logging`` (see ``held_for_log_file``)."""

    def emit(self, record: logging.LogRecord) -> None:
        _HELD.append(record)


@contextlib.contextmanager
def held_for_log_file() -> Iterator[None]:
    """Before ``setup_logging``, keep what is logged in the block for the run's log file (``setup_logging``
    writes it there) instead of letting Python's last-resort handler print it on the terminal: a library
    imported while the flags are checked (vLLM on a CPU: "Triton is installed, but doesn't include CPU
    backend"). A run refused meanwhile has no log file, and its refusal stays the only line."""
    if _ACTIVE is not None:
        yield
        return
    hold = _Hold()
    root = logging.getLogger()
    root.addHandler(hold)
    try:
        yield
    finally:
        root.removeHandler(hold)


_REDIRECT_LOCK = threading.Lock()
_REDIRECTS = {"depth": 0, "saved": ()}


@contextlib.contextmanager
def engine_output_to_log() -> Iterator[None]:
    """While an engine starts its processes, point descriptors 1 and 2 at the log file: the processes it
    starts inherit them, so their prints, progress bars and Python warnings (which no handler of ours
    sees) land in the log, not on the terminal. Nothing changes with --verbose or without a log file."""
    setup = _ACTIVE
    if setup is None or setup.verbose:
        yield
        return
    with _REDIRECT_LOCK:
        if _REDIRECTS["depth"] == 0:
            target = os.open(setup.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            _REDIRECTS["saved"] = (os.dup(1), os.dup(2))
            _point_descriptors_at(target, target)
            os.close(target)
        _REDIRECTS["depth"] += 1
    try:
        yield
    finally:
        with _REDIRECT_LOCK:
            _REDIRECTS["depth"] -= 1
            if _REDIRECTS["depth"] == 0:
                saved_out, saved_err = _REDIRECTS["saved"]
                _point_descriptors_at(saved_out, saved_err)
                os.close(saved_out)
                os.close(saved_err)


def route_transformers() -> None:
    """transformers writes to its own stderr handler; in this process, send its warnings to ours (the
    file) instead. Called again once an engine has imported it."""
    if "transformers" not in sys.modules or not _active():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.set_verbosity_warning()
    except Exception:  # noqa: BLE001 - an old or odd transformers: its default handler stays
        pass


def _active() -> bool:
    return any(getattr(handler, "_beam_captions", False) for handler in logging.getLogger().handlers)
