"""A tiny Cityscapes tree in the official file formats, for the loader and official-evaluation tests.

- ``leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png``: 8-bit RGB PNG
- ``gtFine/{split}/{city}/..._gtFine_labelIds.png``: 8-bit greyscale PNG of label ids (PIL mode "L")
- ``disparity/{split}/{city}/..._disparity.png``: 16-bit greyscale PNG, ``d = (p - 1) / 256``
- ``camera/{split}/{city}/..._camera.json``: the calibration JSON, laid out as the official files
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# The calibration of an official camera file (aachen), per city slightly changed so the test can tell
# that each image's own file is used.
CAMERA = {
    "extrinsic": {"baseline": 0.209313, "pitch": 0.038, "roll": 0.0, "x": 1.7, "y": 0.1, "yaw": -0.0195,
                  "z": 1.18},
    "intrinsic": {"fx": 2262.52, "fy": 2265.3017905988554, "u0": 1096.98, "v0": 513.137},
}

#: Label ids the fixture draws from: evaluated classes plus ignored ones (0 unlabeled, 1 ego vehicle,
#: 4 static, 9 parking, 14 guard rail, 29 caravan). No train (31), so that class is absent everywhere.
FIXTURE_IDS = (0, 1, 4, 7, 8, 9, 11, 12, 13, 14, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 32, 33)


def stem_of(city: str, k: int) -> str:
    return f"{city}_{k:06d}_{19 + k:06d}"


def write_cityscapes(root, split: str = "val", cities=(("aachen", 2), ("bochum", 1)), size=(32, 64),
                     seed: int = 0, ids=FIXTURE_IDS) -> list[dict]:
    """Write the fixture under ``root`` (label ids drawn from ``ids``, plus a band of sky at the top);
    returns one dict per image, sorted as the loader lists them:
    ``stem``, ``city``, ``image`` (RGB uint8), ``label_ids`` (uint8), ``disparity`` (uint16),
    ``camera`` (the JSON dict), ``paths`` (``image``, ``seg``, ``disparity``, ``camera``)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for c, (city, n) in enumerate(cities):
        dirs = {kind: root / kind / split / city for kind in ("leftImg8bit", "gtFine", "disparity", "camera")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            stem = stem_of(city, k)
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            label_ids = rng.choice(np.array(ids, dtype=np.uint8), size=(h, w))
            label_ids[: h // 4] = 23  # a sky band, so some class has a real extent
            disparity = rng.integers(2, 30000, (h, w)).astype(np.uint16)
            disparity[0, :4] = 0  # invalid measurements
            disparity[1, :4] = 1  # zero disparity: infinitely far
            disparity[2, 0] = 257  # d = 1 pixel: depth = baseline * fx
            camera = json.loads(json.dumps(CAMERA))
            camera["extrinsic"]["baseline"] += 0.01 * c
            camera["intrinsic"]["fx"] += 10.0 * k
            paths = {
                "image": dirs["leftImg8bit"] / f"{stem}_leftImg8bit.png",
                "seg": dirs["gtFine"] / f"{stem}_gtFine_labelIds.png",
                "disparity": dirs["disparity"] / f"{stem}_disparity.png",
                "camera": dirs["camera"] / f"{stem}_camera.json",
            }
            cv2.imwrite(str(paths["image"]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            Image.fromarray(label_ids).save(paths["seg"])
            cv2.imwrite(str(paths["disparity"]), disparity)
            paths["camera"].write_text(json.dumps(camera, indent=4))
            out.append({"stem": stem, "city": city, "image": image, "label_ids": label_ids,
                        "disparity": disparity, "camera": camera, "paths": paths})
    return sorted(out, key=lambda s: (s["city"], s["stem"]))
