"""Where llamette's compiled kernels are cached, and when the cache is stale.

Numba checks a cached function against its own source file only: when a kernel it calls changes in
another file, it keeps running the old callee. llamette's kernels call across files, so their
cache is stamped with a hash of every file that compiled code comes from (the kernels, the
weight types and the forward pass), and kept in a directory of its own per version:
~/.cache/llamette/kernels-<hash> (or under $LLAMETTE_CACHE_DIR).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from numba.core import caching

from llamette.errors import LlametteError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
COMPILED_SOURCES = (
    "kernels/*.py",
    "weight_types/*.py",
    "model.py",
)  # where compiled code is defined
STALE_AFTER_SECONDS = 24 * 3600  # other versions' caches unused this long are removed


def source_hash() -> str:
    """A hash of the files compiled code comes from, names and contents."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in COMPILED_SOURCES for p in PACKAGE_DIR.glob(pattern)):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    if "LLAMETTE_CACHE_DIR" in os.environ:
        return Path(os.environ["LLAMETTE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamette"


class PackageCacheLocator(caching._CacheLocator):
    """Numba cache locator for functions defined in llamette: one directory per source hash."""

    stamp = source_hash()
    path = cache_root() / f"kernels-{stamp}"

    def __init__(self, py_file: str, lineno: int):
        relative = Path(py_file).resolve().relative_to(PACKAGE_DIR).with_suffix("")
        self._disambiguator = f"{'.'.join(relative.parts)}-{lineno}"

    @classmethod
    def from_function(cls, py_func, py_file):
        if not Path(py_file).resolve().is_relative_to(PACKAGE_DIR):
            return None
        return cls(py_file, py_func.__code__.co_firstlineno)

    def ensure_cache_path(self):
        try:
            if not self.path.is_dir():
                self.path.mkdir(parents=True, exist_ok=True)
                _remove_unused_versions(self.path)
            tempfile.TemporaryFile(dir=self.path).close()  # writable?
        except OSError as error:
            raise LlametteError(
                f"the kernel cache {self.path} cannot be written ({error.strerror}); "
                "LLAMETTE_CACHE_DIR sets the folder it goes in"
            ) from None

    def get_cache_path(self):
        return str(self.path)

    def get_source_stamp(self):
        return self.stamp

    def get_disambiguator(self):
        return self._disambiguator


def _remove_unused_versions(current: Path) -> None:
    cutoff = time.time() - STALE_AFTER_SECONDS
    for other in current.parent.glob("kernels-*"):
        if other != current and other.stat().st_mtime < cutoff:
            shutil.rmtree(other, ignore_errors=True)


class CompileResultKeepingReloads(caching.CompileResultCacheImpl):
    """Numba's loading of a cached function, which also keeps, with the function's code, what is
    to run before that code is loaded (its reload_init: the parallel layer's start, the kernels it
    calls by symbol, kernels.symbols). A function compiled later that links this code into its
    own then saves them too; Numba drops them (numba/numba#4807), and a later process that loads
    the later function would miss a symbol."""

    def rebuild(self, target_context, payload):
        compiled = super().rebuild(target_context, payload)
        compiled.library._reload_init.update(compiled.reload_init)
        return compiled


def install() -> None:
    """Make Numba use PackageCacheLocator for llamette's functions (before any is decorated), and
    keep what cached functions run as they load (CompileResultKeepingReloads)."""
    locators = getattr(caching.CacheImpl, "_locator_classes", None)
    if isinstance(locators, list) and PackageCacheLocator not in locators:
        locators.insert(0, PackageCacheLocator)
    if caching.FunctionCache._impl_class is caching.CompileResultCacheImpl:
        caching.FunctionCache._impl_class = CompileResultKeepingReloads
