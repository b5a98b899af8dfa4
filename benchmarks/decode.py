"""What one large photo costs to decode, per format: time and peak memory of ``load_image``.

    nice -n 10 python -m benchmarks.decode [--photo ../shared/data/cats_vs_dogs/val/cat/cat.4001.jpg] [--repeat 3]

Each case is a real file encoded from a real photo (upscaled, with sensor-like noise for the JPEGs)
and decoded to 224 x 224 in a fresh subprocess, so the peak resident set (VmHWM) it reports is that
decode's alone: ``peak MiB`` = VmHWM after the decodes - VmHWM with the file already read. The cases:
every default format at 8064 x 6048 (48.8 MP, an iPhone HEIC's size: the declared-size limit applies),
a 200 MP baseline JPEG (draft-decoded at 1/8) and a 48.8 MP progressive JPEG (full coefficient buffer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from tests import photos

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTO = REPO.parent / "shared" / "data" / "cats_vs_dogs" / "val" / "cat" / "cat.4001.jpg"
MP48 = (8064, 6048)
MP200 = (16320, 12240)

CHILD = """
import sys, time, json
from pathlib import Path
from app.core.imaging import load_image

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

data = Path(sys.argv[1]).read_bytes()
base = hwm()
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    load_image(data, 224)
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "peak": hwm() - base}))
"""


def cases(photo: Path, folder: Path) -> list[tuple[str, Path]]:
    out = []
    with Image.open(photo) as src:
        src = src.convert("RGB")
        big = src.resize(MP48, Image.Resampling.BILINEAR)
        for fmt in photos.SAVE:
            path = folder / f"48mp.{fmt.lower()}"
            image = photos.textured(src, MP48) if fmt == "JPEG" else big
            extra = {"quality": 60} if fmt == "HEIF" else {}
            path.write_bytes(photos.encode(image, fmt, **extra))
            out.append((f"{fmt} 8064x6048", path))
        out.append(("JPEG progressive 8064x6048", folder / "48mp_progressive.jpg"))
        photos.textured(src, MP48).save(out[-1][1], "JPEG", quality=90, progressive=True)
        out.append(("JPEG baseline 16320x12240", photos.phone_jpeg(photo, MP200, folder / "200mp.jpg")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        made = cases(args.photo, Path(tmp))
        print(f"encoded {len(made)} files in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        print("| case | file MB | decode s (median) | peak MiB |\n|---|---|---|---|")
        for name, path in made:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(args.repeat)], cwd=REPO, capture_output=True, text=True, check=True
            )
            result = json.loads(out.stdout)
            row = {
                "case": name,
                "file_mb": round(path.stat().st_size / 1e6, 1),
                "decode_s": round(statistics.median(result["times"]), 3),
                "peak_mib": round(result["peak"] / 2**20),
            }
            rows.append(row)
            print(f"| {name} | {row['file_mb']} | {row['decode_s']} | {row['peak_mib']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
