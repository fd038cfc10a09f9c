"""Shared fixtures: where the patched llama.cpp build lives, and a way to run its tools."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = Path(os.environ.get("JLCM_BUILD_DIR", ROOT / "build"))


def tool(name: str) -> Path:
    path = BUILD_DIR / "bin" / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup.sh (or cmake --build build) first")
    return path


def run(args, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 600)
    return subprocess.run([str(a) for a in args], **kw)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
