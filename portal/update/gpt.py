"""The GPT partition table of a disk, read from the disk itself.

udev's /dev/disk/by-partlabel links are only as fresh as the kernel's view of
the table, and the kernel does not re-read the table of a disk in use when
systemd-sysupdate relabels a slot. So after an update the new slot is found
here, by its label, and reached through its partition UUID (which an update
does not change, so its link exists)."""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
VAR = uuid.UUID("4d21b016-b534-45c2-a9fb-5c16e091fd2d")
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS_BOOT = uuid.UUID("21686148-6449-6e6f-744e-656564454649")


@dataclass(frozen=True)
class Partition:
    number: int
    type: uuid.UUID
    uuid: uuid.UUID
    label: str
    size: int            # bytes


def read(path: Path, sector: int = 512) -> list[Partition]:
    """The used entries of the primary GPT of `path` (a disk or an image file)."""
    with path.open("rb") as f:
        f.seek(sector)
        header = f.read(92)
        if header[:8] != b"EFI PART":
            raise ValueError(f"{path} has no GPT")
        lba, count, size = struct.unpack_from("<QII", header, 72)
        if not (128 <= size <= 4096 and count <= 1024):
            raise ValueError(f"{path}: a GPT header this program does not read")
        f.seek(lba * sector)
        table = f.read(count * size)
    out = []
    for i in range(count):
        e = table[i * size:(i + 1) * size]
        kind = uuid.UUID(bytes_le=e[:16])
        if kind.int:
            first, last = struct.unpack_from("<QQ", e, 32)
            out.append(Partition(i + 1, kind, uuid.UUID(bytes_le=e[16:32]),
                                 e[56:128].decode("utf-16le", "replace").rstrip("\x00"),
                                 (last - first + 1) * sector))
    return out


def root_disk(mount: str = "/") -> Path:
    """The whole disk the file system at `mount` is on (e.g. /dev/vda for /dev/vda3)."""
    st = os.stat(mount)
    part = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    return Path("/dev") / part.parent.name
