"""Prepare what a lent GPU machine needs to run the GPU checks (tests/gpu/device_check.sh).

That machine has Python 3.12 with PyTorch and most of ComfyUI's requirements, no network and no ComfyUI.
This writes two ignored folders of the repository root, to be named in the device tool's ``carry``:

* ``.whl/``: wheels of the packages that ComfyUI 0.3.75 imports at boot and that machine lacks, at the
  versions of this checkout's ``.venv`` (the ones the test suite runs with);
* ``.devcarry/comfyui.tgz``: the ComfyUI tree that ``make setup`` put in ``.cache/``.

``--simulate DIR`` writes instead a ``sitecustomize.py`` into DIR that makes this environment refuse to
import any installed distribution the machine lacks and the wheels do not bring: with DIR on PYTHONPATH,
``SKIP_WHEELS=1 MERGELAB_GPU_TESTS=cpu PYTHON=.venv/bin/python bash tests/gpu/device_check.sh`` is a dry run
of the device check here (tests/integration/test_gpu_suite.py boots ComfyUI with the pack that way).

Run it with the test environment's Python after ``make setup``:
``.venv/bin/python tests/gpu/device_carry.py`` (``--check`` only lists what would be carried).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# Imported when ComfyUI boots (ComfyUI's own requirements and their dependencies) and absent from the lent
# machines' image (its package list: .library/device/KINDS.md, "Python packages already there").  pydantic
# wants a typing-extensions newer than the image's.
DEVICE_MISSING = ("torchsde", "trampoline", "av", "pydantic", "pydantic_core", "pydantic-settings",
                  "annotated-types", "typing-inspection", "typing_extensions", "python-dotenv")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
IMAGE_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "device_image_packages.txt")
# what this environment's newer transformers / huggingface_hub import; the machine's own versions bring theirs
NOT_SIMULATED = ("httpx2", "httpcore2", "truststore")
CARRY_LIMIT = 60 << 20          # the device tool moves 64 MiB a call, the working tree included
WHEEL_DIR = os.path.join(ROOT, ".whl")
CARRY_DIR = os.path.join(ROOT, ".devcarry")


def pinned() -> list:
    """``name==version`` for each package of DEVICE_MISSING, from the running environment."""
    out = []
    for name in DEVICE_MISSING:
        try:
            out.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.executable}; run `make setup` and use .venv/bin/python")
    return out


def download(pins: list) -> None:
    os.makedirs(WHEEL_DIR, exist_ok=True)
    for old in os.listdir(WHEEL_DIR):                  # one version of each: two stop the install there
        os.remove(os.path.join(WHEEL_DIR, old))
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *plat, "-d", WHEEL_DIR, *pins]
    subprocess.run(cmd, check=True)


def pack_comfyui() -> str:
    from mergelab.comfy_env import comfyui_root
    src = comfyui_root()
    os.makedirs(CARRY_DIR, exist_ok=True)
    dest = os.path.join(CARRY_DIR, "comfyui.tgz")
    tmp = dest + ".part"

    def skip(info):
        parts = info.name.split("/")
        return None if "__pycache__" in parts or ".git" in parts else info

    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(src, arcname="ComfyUI", filter=skip)
    os.replace(tmp, dest)
    return dest


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set:
    with open(IMAGE_LIST, encoding="utf-8") as f:
        return {_norm(n) for line in f if not line.startswith("#") for n in line.split()}


def modules_missing_there() -> list:
    """Top-level modules installed here whose distributions neither the machine nor the wheels hold."""
    there = image_packages() | {_norm(n) for n in DEVICE_MISSING}
    return sorted(m for m, dists in md.packages_distributions().items()
                  if m not in NOT_SIMULATED and not any(_norm(d) in there for d in dists))


def write_simulation(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "sitecustomize.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""\"\"\"Written by tests/gpu/device_carry.py --simulate: imports fail as on the lent GPU machine.\"\"\"
import sys

MISSING = frozenset({modules_missing_there()!r})


class _NotOnTheDevice:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, _NotOnTheDevice())
""")
    return path


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only print the wheels that would be carried")
    ap.add_argument("--simulate", metavar="DIR", help="write DIR/sitecustomize.py that refuses the imports the "
                                                      "GPU machine cannot serve (see the module docstring)")
    args = ap.parse_args(argv)
    if args.simulate:
        print("written:", write_simulation(args.simulate))
        print("refused:", " ".join(modules_missing_there()))
        return 0
    pins = pinned()
    print("wheels:", " ".join(pins))
    if args.check:
        return 0
    download(pins)
    tgz = pack_comfyui()
    total = _size(WHEEL_DIR) + _size(tgz)
    print(f".whl {_size(WHEEL_DIR) / 2**20:.1f} MiB, {os.path.relpath(tgz, ROOT)} {_size(tgz) / 2**20:.1f} MiB")
    if total > CARRY_LIMIT:
        print(f"warning: {total / 2**20:.1f} MiB to carry, over the device tool's budget", file=sys.stderr)
        return 1
    print('carry: [".whl", ".devcarry"]; command: bash tests/gpu/device_check.sh')
    return 0


if __name__ == "__main__":
    sys.exit(main())
