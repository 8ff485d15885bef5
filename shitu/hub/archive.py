"""Safe extraction of a downloaded model archive (tar).

Every member is checked before anything is written: only regular files and folders, relative names without
``..``, each under a size limit and all together under another, and not too many of them. The first member
that breaks a rule is a ShituError naming it. The extraction itself then runs with ``tarfile``'s ``data``
filter, which enforces the same rules once more.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath

from shitu.errors import ShituError

#: The largest member accepted (PaddleX's largest recognition model, CLIP ViT-L, has a ~1.2 GB .pdiparams).
MAX_MEMBER_BYTES = 4 << 30
#: The most all members together may hold.
MAX_TOTAL_BYTES = 8 << 30
MAX_MEMBERS = 1000


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if "\x00" in name or not name.strip():
        return "an empty or NUL-holding name"
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in path.parts:
        return "a path that climbs out with '..'"
    if member.issym() or member.islnk():
        return f"a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r})"
    if member.ischr() or member.isblk() or member.isfifo():
        return "a device or FIFO"
    if not (member.isfile() or member.isdir()):
        return "not a regular file or folder"
    return None


def safe_extract(
    archive: Path,
    destination: Path,
    *,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> None:
    """Extract the tar ``archive`` into the existing folder ``destination``, refusing hostile members."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for member in tar:  # headers are read one by one: a forged one is refused before the next is read
                problem = _member_problem(member)
                if problem is None and member.size > max_member_bytes:
                    problem = f"{member.size} bytes, over the {max_member_bytes}-byte limit for one member"
                total += member.size
                if problem is None and total > max_total_bytes:
                    problem = f"the archive unpacks to over {max_total_bytes} bytes"
                if problem is None and len(members) >= max_members:
                    problem = f"more than {max_members} members"
                if problem is not None:
                    raise ShituError(f"refusing archive member {member.name!r}: {problem}", path=archive)
                members.append(member)
            # tarfile's 'data' filter (Python 3.12, 3.11.4+) re-checks names, links and modes on extraction.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(destination, members=members, **extra)
    except ShituError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ShituError(f"not a readable tar archive: {exc}", path=archive) from None
    _check_inside(destination)


def _check_inside(destination: Path) -> None:
    """Belt and braces: nothing extracted is a link or lies outside ``destination``."""
    root = destination.resolve()
    for folder, dirs, files in os.walk(destination):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                raise ShituError("an extracted entry is a link or lies outside the cache", path=path)


def find_inference_model(folder: Path) -> Path:
    """The folder of the extracted archive that holds ``inference.pdiparams`` (PaddleX's ``<name>_infer/``)."""
    found = sorted(p.parent for p in folder.rglob("inference.pdiparams") if p.is_file())
    if not found:
        raise ShituError("the archive holds no Paddle inference model (no inference.pdiparams)", path=folder)
    if len(found) > 1:
        raise ShituError(f"the archive holds {len(found)} inference models; expected one", path=folder)
    return found[0]
