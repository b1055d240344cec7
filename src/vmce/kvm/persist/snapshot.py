"""Snapshots for tests: boot a slow guest once, restore it many times, cheaply.

A :class:`Snapshot` is an ordinary stream file. It is checked and decoded once; each
:meth:`Snapshot.restore` then builds a new VM whose RAM is mapped copy-on-write from the file
(``MAP_PRIVATE``: the guest's reads share the page cache, its first write to a page copies
that page), so a restore costs page-table set-up, not a copy of the guest's memory.

The file must not be modified while a snapshot or a VM restored from it exists (a private
mapping still sees changes to pages the guest has not written); :meth:`Snapshot.restore`
re-checks the file if its size, inode or modification time changed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmce.kvm.persist.image import VmImage
from vmce.kvm.persist.index import StreamIndex
from vmce.kvm.persist.restore import BuildReport, FileChanged, plan_restore, restore_from
from vmce.kvm.persist.save import SaveReport, save_vm
from vmce.kvm.vmcevm import VmceVm
from vmce.vmce import HostProfile


@dataclass(frozen=True)
class _FileId:
    size: int
    inode: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileId:
        st = path.stat()
        return cls(st.st_size, st.st_ino, st.st_mtime_ns)


class Snapshot:
    """A saved VM that restores copy-on-write from its file."""

    def __init__(self, path: str | os.PathLike[str], *, profile: HostProfile | None = None) -> None:
        self.path = Path(path)
        self.profile = profile
        #: How the last :meth:`restore` went (pages mapped and copied, timings).
        self.last: BuildReport | None = None
        self._plan: tuple[_FileId, StreamIndex, VmImage] | None = None

    @classmethod
    def take(cls, vm: VmceVm, path: str | os.PathLike[str], *, resume: bool = True) -> Snapshot:
        """Save ``vm`` (see :func:`~vmce.kvm.persist.save.save_vm`) and return its snapshot."""
        report: SaveReport = save_vm(vm, path, resume=resume)
        return cls(report.path)

    def _checked(self) -> tuple[StreamIndex, VmImage]:
        fid = _FileId.of(self.path)
        if self._plan is None or self._plan[0] != fid:
            index, image = plan_restore(self.path, profile=self.profile)
            self._plan = (fid, index, image)
        return self._plan[1], self._plan[2]

    @property
    def image(self) -> VmImage:
        """The decoded VM (checked once)."""
        return self._checked()[1]

    def restore(self, *, on_serial_line: Callable[[str], None] | None = None) -> VmceVm:
        """A new, not yet started VM continuing the saved one, its RAM mapped from the file."""
        for attempt in range(2):
            index, image = self._checked()
            assert self._plan is not None
            fid = self._plan[0]
            try:
                vm, self.last = restore_from(
                    self.path,
                    index,
                    image,
                    cow=True,
                    on_serial_line=on_serial_line,
                    expect=(fid.size, fid.inode, fid.mtime_ns),
                )
            except FileChanged:
                if attempt:
                    raise
                self._plan = None  # replaced since it was checked: check the new file
                continue
            return vm
        raise AssertionError("unreachable")
