"""The sdist: MIT license metadata (PEP 639), and everything the test suite reads.

The sdist is built in-process with setuptools' PEP 517 hook, as a build frontend would call it
(cwd = the repository root). The build writes ``gradmod.egg-info`` into the repository; the
fixture puts back whatever was there before, so the test leaves the tree as it found it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The setuptools that reads ``license = "MIT"`` (an SPDX expression) and ``license-files``.
#: pyproject.toml's build-system and test extra require it too.
SETUPTOOLS_MIN = (77, 0, 3)
#: Directories whose tracked files the sdist must carry: the tests and what they run or read.
SHIPPED_DIRS = ("examples", "benchmarks", "docs", "tests")
#: Single files the tests read (README.md, .ci/run) or the package needs, and the license.
SHIPPED_FILES = ("LICENSE", "README.md", "CHANGELOG.md", ".ci/run", "gradmod/py.typed")


class Sdist:
    def __init__(self, path: Path) -> None:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            top = {PurePosixPath(m.name).parts[0] for m in members}
            assert len(top) == 1, f"the sdist has more than one top-level directory: {top}"
            (self.top,) = top
            pkg_info = tar.extractfile(f"{self.top}/PKG-INFO")
            assert pkg_info is not None
            self.pkg_info = HeaderParser().parsestr(pkg_info.read().decode())
        #: Paths of the regular files, relative to the sdist's top-level directory.
        self.files = {
            PurePosixPath(m.name).relative_to(self.top).as_posix() for m in members if m.isfile()
        }


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Sdist:
    import setuptools
    from setuptools import build_meta

    found = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:3])
    assert found >= SETUPTOOLS_MIN, (
        f"setuptools {setuptools.__version__} cannot read pyproject.toml's SPDX license "
        f"(needs >= {'.'.join(map(str, SETUPTOOLS_MIN))}): install the test extra"
    )
    tmp = tmp_path_factory.mktemp("sdist")
    egg_info = ROOT / "gradmod.egg-info"
    backup = tmp / "egg-info-backup"
    if egg_info.exists():  # e.g. left by an editable install: restored as it was
        shutil.copytree(egg_info, backup)
    entries_before = set(os.listdir(ROOT))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ROOT)
            mp.setattr(sys, "argv", list(sys.argv))  # build_meta overwrites sys.argv
            name = build_meta.build_sdist(str(tmp / "dist"))
    finally:
        shutil.rmtree(egg_info, ignore_errors=True)
        if backup.exists():
            shutil.copytree(backup, egg_info)
    assert set(os.listdir(ROOT)) == entries_before, "the build left files in the repository"
    return Sdist(tmp / "dist" / name)


def tracked_files() -> list[str]:
    """The files under SHIPPED_DIRS that git tracks (and that exist: a deletion in progress is
    not the sdist's business). Skips where the tests do not run from a git checkout."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed: the expected file list comes from `git ls-files`")
    top = subprocess.run(
        [git, "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True
    )
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        reason = top.stderr.strip() or f"the checkout's top level is {top.stdout.strip()}"
        pytest.skip(f"{ROOT} is not a git checkout ({reason})")
    listed = subprocess.run(
        [git, "ls-files", "-z", "--", *SHIPPED_DIRS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    files = [f for f in listed.stdout.split("\0") if f and (ROOT / f).is_file()]
    assert files, f"git tracks no files under {SHIPPED_DIRS}"
    return files


def test_sdist_declares_the_mit_license_as_an_spdx_expression(sdist: Sdist) -> None:
    assert "LICENSE" in sdist.files
    assert sdist.pkg_info.get_all("License-Expression") == ["MIT"]
    assert sdist.pkg_info.get_all("License-File") == ["LICENSE"]
    assert sdist.pkg_info.get("License") is None, "the deprecated License field is still set"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_sdist_ships_everything_the_tests_read(sdist: Sdist) -> None:
    expected = {*tracked_files(), *SHIPPED_FILES}
    missing = sorted(expected - sdist.files)
    assert not missing, f"the sdist lacks {missing}: see MANIFEST.in"
    junk = sorted(f for f in sdist.files if "__pycache__" in f or f.endswith((".pyc", ".pyo")))
    assert not junk, f"the sdist ships bytecode: {junk}"
