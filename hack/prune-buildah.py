"""Which buildah images `make images` no longer needs: print their ids, one per line.

    python3 hack/prune-buildah.py STORAGE_DIR HASH [HASH...] < labels

A build with `--layers` keeps one image per Dockerfile step as its layer cache; every rebuild of
the trainer after a dependency change adds gigabytes. Kept: named images (the python base), the
final image of each current archive (its `io.kubetron.inputs` label is one of HASH...) and every
image whose top layer is an ancestor of a kept one's (the cached steps the current builds were
made from, the heavy dependency layer included, so the next rebuild still reuses them). All
other images are printed. stdin holds `ID LABEL` lines (the label as `buildah inspect` shows
it; empty when none). Reads containers/storage's overlay-images/images.json and
overlay-layers/layers.json; prints nothing when they are missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def garbage(
    images: list[dict[str, object]],
    parents: dict[str, str | None],
    labels: dict[str, str],
    current: set[str],
) -> list[str]:
    """Ids of the images that are neither kept nor below a kept one (module docstring)."""
    roots = [i for i in images if i.get("names") or labels.get(str(i["id"])) in current]
    if not any(labels.get(str(i["id"])) in current for i in images):
        return []  # no current final image in storage: keep everything rather than guess
    keep: set[str] = set()
    for image in roots:
        layer: str | None = str(image["layer"])
        while layer is not None and layer not in keep:
            keep.add(layer)
            layer = parents.get(layer)
    return [str(i["id"]) for i in images if str(i["layer"]) not in keep]


def main(argv: list[str]) -> int:
    storage, current = Path(argv[0]), set(argv[1:])
    images_file = storage / "overlay-images" / "images.json"
    layers_file = storage / "overlay-layers" / "layers.json"
    if not images_file.is_file() or not layers_file.is_file():
        return 0
    images = json.loads(images_file.read_text())
    parents = {str(x["id"]): x.get("parent") for x in json.loads(layers_file.read_text())}
    labels = {}
    for line in sys.stdin:
        parts = line.split()
        if parts:
            labels[parts[0]] = parts[1] if len(parts) > 1 else ""
    for image_id in garbage(images, parents, labels, current):
        print(image_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
