"""SDK-process stand-ins for tests that need a real second process (kept apart from the test modules, so that a
spawned process imports only what it uses)."""

from __future__ import annotations

import time


def _not_built_here():
    raise AssertionError("the shared server is the test process's")


def wait_for_a_place(tag: str, path: str, waiting) -> None:
    """Connect to the shared server ``tag`` under ``path``, set ``waiting``, then wait in ``reserve`` until killed."""
    from apache_beam.utils import multi_process_shared

    server = multi_process_shared.MultiProcessShared(_not_built_here, tag=tag, path=path, always_proxy=True).acquire()
    waiting.set()
    server.reserve()
    time.sleep(3600)
