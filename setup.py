"""Thin shim so that Dataflow can stage the package with ``--setup_file``; metadata lives in pyproject.toml."""

from setuptools import setup

setup()
