"""Renders the README images (docs/images/*.png) from the real UI: a ComfyUI server with MergeLab and
headless Chromium, as in the browser test.

    .venv/bin/python tests/browser/make_docs_images.py [--out docs/images]

Needs what tests/browser/setup.sh installs.  Images larger than 200 KB are re-encoded with a palette.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from comfy_server import running_server  # noqa: E402

MAX_BYTES = 200_000
IMAGES = ("method_node.png", "block_weight_editor.png", "merger.png")


def shrink(path: str) -> None:
    if os.path.getsize(path) <= MAX_BYTES:
        return
    from PIL import Image

    img = Image.open(path).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "images"))
    a = ap.parse_args()
    work = os.path.join(ROOT, "test-output", "docs_images")
    os.makedirs(work, exist_ok=True)
    # two (empty) checkpoint files, so the loaders in the merger picture show model names
    base = tempfile.mkdtemp(prefix="mergelab_docs_")
    ckpts = os.path.join(base, "models", "checkpoints")
    os.makedirs(ckpts)
    for name in ("model_A.safetensors", "model_B.safetensors"):
        open(os.path.join(ckpts, name), "wb").close()
    try:
        return _render(a, work, base)
    finally:
        link = os.path.join(base, "custom_nodes", "MergeLab")
        if os.path.islink(link):
            os.unlink(link)
        shutil.rmtree(base, ignore_errors=True)


def _render(a, work: str, base: str) -> int:
    with running_server(os.path.join(work, "server.log"), base=base) as srv:
        proc = subprocess.run(["node", os.path.join(HERE, "frontend_check.mjs"), "--url", srv.url, "--out", work,
                               "--docs", "--docs-dir", os.path.abspath(a.out)],
                              cwd=HERE, env=dict(os.environ, CHROMIUM=os.environ.get("CHROMIUM", "/usr/bin/chromium")))
    with open(os.path.join(work, "result.json"), encoding="utf-8") as f:
        steps = json.load(f)["steps"]
    failed = {k: v.get("error") for k, v in steps.items() if not v["ok"]}
    if proc.returncode or failed:
        print("failed:", json.dumps(failed, indent=1), file=sys.stderr)
        return 1
    for name in IMAGES:
        path = os.path.join(a.out, name)
        shrink(path)
        print(f"{path}: {os.path.getsize(path) // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
