"""``python bench/gpu_wheels.py slim WHEEL``: drop the native libraries a GPU machine of this
workplace cannot use from a bitsandbytes wheel, in place.

The bitsandbytes wheel carries one library per CUDA, ROCm and XPU version (43 MB); the
lent machines run torch built for CUDA 13 (docs/benchmarks.md), and what travels to them
is limited to 64 MiB. The CPU library and the CUDA 13.x ones are kept (~8 MB), and the
wheel's RECORD is rewritten to match, so it stays a valid wheel. ``KEEP`` says what stays.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
NATIVE = re.compile(r"libbitsandbytes_\w+\.(so|dll|dylib)$")


def slim(wheel: Path) -> tuple[int, int]:
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    dropped: set[str] = set()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if NATIVE.search(item.filename) and not KEEP.search(item.filename):
                dropped.add(item.filename)
        if not any(KEEP.search(n) and "cuda" in n for n in src.namelist()):
            raise SystemExit(f"{wheel.name}: no CUDA 13 library in it; nothing would run on the GPU")
        for item in src.infolist():
            if item.filename in dropped:
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if x.split(",", 1)[0] not in dropped) + "\n").encode()
            dst.writestr(item, data)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "slim":
        print(__doc__, file=sys.stderr)
        return 2
    before, after = slim(Path(argv[1]))
    print(f"{Path(argv[1]).name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
