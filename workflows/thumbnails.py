"""Template thumbnails and README pictures from the browser test's screenshots.

    python -m pytest tests/test_browser.py          # writes test-artifacts/browser/NAME.png
    python workflows/thumbnails.py [test-artifacts/browser]

writes ``workflows/NAME.jpg`` (ComfyUI's Templates browser shows ``NAME.jpg`` beside ``NAME.json``) and
``docs/workflows/NAME.png`` (a small PNG the README shows) for each screenshot of a shipped UI workflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

WORKFLOWS = Path(__file__).resolve().parent
DOCS = WORKFLOWS.parent / "docs" / "workflows"
THUMBNAIL_WIDTH, DOCS_WIDTH, DOCS_COLOURS = 512, 1200, 128


def _resized(image: Image.Image, width: int) -> Image.Image:
    return image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)


def write_pictures(screenshot: Path) -> list[Path]:
    name = screenshot.stem
    image = Image.open(screenshot).convert("RGB")
    thumbnail = WORKFLOWS / f"{name}.jpg"
    _resized(image, THUMBNAIL_WIDTH).save(thumbnail, quality=85, optimize=True)
    DOCS.mkdir(parents=True, exist_ok=True)
    picture = DOCS / f"{name}.png"
    _resized(image, DOCS_WIDTH).quantize(DOCS_COLOURS, dither=Image.Dither.NONE).save(picture, optimize=True)
    return [thumbnail, picture]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("screenshots", nargs="?", type=Path, default=WORKFLOWS.parent / "test-artifacts" / "browser")
    args = parser.parse_args(argv)
    shipped = {path.stem for path in WORKFLOWS.glob("*.json")}
    found = sorted(path for path in args.screenshots.glob("*.png") if path.stem in shipped)
    if not found:
        parser.error(f"no screenshots of shipped workflows in {args.screenshots}: run tests/test_browser.py first")
    for screenshot in found:
        for path in write_pictures(screenshot):
            print(path)
    missing = shipped - {path.stem for path in found}
    if missing:
        print(f"no screenshot for: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
