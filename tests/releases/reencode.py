"""Re-encode an image directory with another CRIU release's pycriu (run by make_fixtures.py in a
process of its own: two releases' generated classes cannot share one protobuf pool).

    python reencode.py OLD_PYCRIU_PARENT IMAGES_DIR

Each image is loaded with that release's classes (fields it does not know are dropped) and
written back; an image whose magic it does not know is removed, as that release would not
have written it. pages-*.img (raw pages) stay as they are.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])

import pycriu.images as old


def main(directory: Path) -> None:
    for path in sorted(directory.glob("*.img")):
        if path.name.startswith("pages-"):
            continue
        try:
            with path.open("rb") as f:
                image = old.load(f)
        except Exception as e:  # pycriu raises bare Exception for a magic it does not know
            print(f"{path.name}: dropped ({e})", file=sys.stderr)
            path.unlink()
            continue
        buf = io.BytesIO()
        old.dump(image, buf)
        path.write_bytes(buf.getvalue())


if __name__ == "__main__":
    main(Path(sys.argv[2]))
