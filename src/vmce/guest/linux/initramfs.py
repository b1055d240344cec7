"""A newc ``cpio`` initramfs built in Python: directories, device nodes, files, symlinks."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Initramfs:
    """Entries in the order they are added; ``build()`` gives the archive bytes."""

    entries: list[Entry] = field(default_factory=list)

    def dir(self, path: str) -> None:
        self.entries.append(Entry(path, stat.S_IFDIR | 0o755))

    def file(self, path: str, data: bytes, mode: int = 0o755) -> None:
        self.entries.append(Entry(path, stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        self.entries.append(Entry(path, stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.entries.append(Entry(path, stat.S_IFCHR | mode, rdev=(major, minor)))

    def build(self) -> bytes:
        out = bytearray()
        for ino, e in enumerate([*self.entries, Entry(TRAILER, 0)], start=1):
            name = e.path.lstrip("/").encode() + b"\0"
            fields = [
                ino,
                e.mode,
                0,
                0,
                1,
                0,
                len(e.data),
                0,
                0,
                e.rdev[0],
                e.rdev[1],
                len(name),
                0,
            ]
            out += NEWC_MAGIC + b"".join(f"{v:08x}".encode() for v in fields)
            out += name
            out += b"\0" * (-len(out) % 4)
            out += e.data
            out += b"\0" * (-len(out) % 4)
        out += b"\0" * (-len(out) % 512)
        return bytes(out)
