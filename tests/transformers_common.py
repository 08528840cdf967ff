"""transformers' own common model tests (ModelTesterMixin, ConfigTester), taken from the source distribution
of the installed transformers version at test time; their code is never copied into this repository.

The sdist is downloaded once with pip into a cache (``DYNREFER_TRANSFORMERS_SDIST`` or
``~/.cache/dynrefer_hf/transformers-sdist``); ``tests/test_modeling_common.py`` and
``tests/test_configuration_common.py`` are extracted from it into a package whose relative imports the sdist
does not ship (``.exporters``, ``.generation``, ``.utils``) are served by our stand-ins in
``tests/transformers_stand_ins``. Without network the download fails and so do the tests that need it: a
RuntimeError at collection, never a silent skip.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import transformers

STAND_INS = Path(__file__).resolve().parent / "transformers_stand_ins"
PACKAGE = "transformers_common_tests"
FILES = ("test_modeling_common.py", "test_configuration_common.py")


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "dynrefer_hf" / "transformers-sdist"
    return Path(os.environ.get("DYNREFER_TRANSFORMERS_SDIST", default))


def _sdist(version: str, cache: Path) -> Path:
    archive = cache / f"transformers-{version}.tar.gz"
    if archive.is_file():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
        f"transformers=={version}", "-d", str(cache),
    ]  # fmt: skip
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    if completed.returncode != 0 or not archive.is_file():
        raise RuntimeError(
            f"could not download the transformers {version} source distribution (needed for transformers' "
            f"common model tests): {' '.join(command)} exited with {completed.returncode}:\n"
            f"{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}"
        )
    return archive


def load_common_tests():
    """``(test_modeling_common, test_configuration_common)`` modules of the installed transformers version."""
    version = transformers.__version__
    cache = _cache_dir()
    root = cache / version
    package = root / PACKAGE
    if not all((package / name).is_file() for name in FILES):
        archive = _sdist(version, cache)
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for name in FILES:
                member = tar.extractfile(f"transformers-{version}/tests/{name}")
                if member is None:
                    raise RuntimeError(f"{archive} has no tests/{name}")
                (package / name).write_bytes(member.read())
    # the package's subpackages .exporters, .generation, .utils come from our stand-ins
    (package / "__init__.py").write_text(f"__path__.append({str(STAND_INS)!r})\n")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )
