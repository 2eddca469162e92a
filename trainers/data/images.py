"""Images by file name, from a folder or from tar shards (`ImageStore`)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import PIL.Image

from ._common import BadSample, decode_image, expand_paths, read_file_bytes

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class ImageStore:
    """Look images up by name in a folder or in tar files (plain or compressed).

    `source`: a directory (names are paths relative to it), a ``.tar`` file, a list of tar files, a glob, or a
    directory holding only tar files. In tars a member is found by its full path or by its base name.
    Tar members are indexed on first use in each process and read through a per-process file handle, so the store
    may be copied into DataLoader workers (fork or spawn).
    """

    def __init__(self, source):
        self.source = source
        self.folder: str | None = None
        self.tars: list[str] = []
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if len(paths) == 1 and Path(paths[0]).is_dir():
            folder = Path(paths[0])
            has_images = any(p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())
            tars = sorted(str(p) for p in folder.rglob("*.tar"))
            if tars and not has_images:
                self.tars = tars
            else:
                self.folder = str(folder)
        else:
            self.tars = expand_paths(paths, (".tar", ".tar.gz", ".tgz"))
        self._index: dict[str, tuple[int, tarfile.TarInfo]] | None = None
        self._handles: dict[int, tarfile.TarFile] = {}
        self._pid: int | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def _tar(self, i: int) -> tarfile.TarFile:
        if self._pid != os.getpid():  # never share an open file offset with another process
            self._handles, self._pid = {}, os.getpid()
        if i not in self._handles:
            self._handles[i] = tarfile.open(self.tars[i], "r:*")
        return self._handles[i]

    def _build_index(self) -> dict:
        index: dict[str, tuple[int, tarfile.TarInfo]] = {}
        for i in range(len(self.tars)):
            for member in self._tar(i).getmembers():
                if member.isfile():
                    index.setdefault(member.name, (i, member))
                    index.setdefault(os.path.basename(member.name), (i, member))
        return index

    def find(self, names) -> str | None:
        """The first of `names` that exists in the store, or None."""
        for name in [names] if isinstance(names, str) else names:
            if not name:
                continue
            if self.folder is not None:
                if os.path.isfile(os.path.join(self.folder, name)):
                    return name
            else:
                if self._index is None:
                    self._index = self._build_index()
                if name in self._index:
                    return name
        return None

    def where(self, name: str) -> str:
        if self.folder is not None:
            return os.path.join(self.folder, name)
        if self._index is not None and name in self._index:
            i, member = self._index[name]
            return f"{self.tars[i]}:{member.name}"
        return f"{name} (in {len(self.tars)} tar file(s))"

    def read(self, name: str) -> bytes:
        """Bytes of image `name`; `BadSample("missing_image")` if absent."""
        if self.folder is not None:
            return read_file_bytes(os.path.join(self.folder, name))
        if self.find(name) is None:
            raise BadSample("missing_image", f"image {name} is in none of the tar files {self.tars}")
        i, member = self._index[name]
        handle = self._tar(i).extractfile(member)
        if handle is None:
            raise BadSample("missing_image", f"{self.tars[i]}:{member.name} is not a regular file")
        return handle.read()

    def load(self, names) -> tuple[PIL.Image.Image, str]:
        """(RGB image, where) for the first of `names` found; `BadSample` if none exists or it does not decode."""
        names = [names] if isinstance(names, str) else list(names)
        found = self.find(names)
        if found is None:
            shown = " or ".join(repr(n) for n in dict.fromkeys(names))
            place = self.folder if self.folder is not None else f"the tar files {self.tars}"
            raise BadSample("missing_image", f"image file {shown} not found in {place}")
        where = self.where(found)
        return decode_image(self.read(found), where), where

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
