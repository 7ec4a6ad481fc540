"""Builds SuffixDecoding's own suffix-tree cache (the real peer) from the registry's arctic-inference sdist.

Only `csrc/suffix_decoding` (C++ with nanobind) and the two Python files that wrap it
(`arctic_inference/suffix_decoding/{__init__,cache}.py`) are used; the rest of the package needs
torch and vLLM. cmake, ninja and nanobind come from the registry into the build folder, never into
the project's environment: the peer is a baseline for `experiments/sam_acceptance.py`, not a
dependency. About a minute on 2 cores.

  python tools/build_suffix_decoding.py            # -> build/suffix_decoding/
  make suffix-decoding

Afterwards `build/suffix_decoding/site` holds an importable `arctic_inference.suffix_decoding`
(see `experiments/suffix_decoding_peer.py`, which puts it on sys.path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tarfile
import urllib.request

VERSION = "0.3.0"
SDIST = f"arctic_inference-{VERSION}.tar.gz"
INDEX = "https://pypi.org/simple/arctic-inference/"
BUILD_TOOLS = ["cmake", "ninja", "nanobind"]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def fetch_sdist(dest: pathlib.Path) -> pathlib.Path:
    """Downloads the sdist through the registry's simple index (JSON form) and checks its sha256.
    (`pip download --no-binary` would first build the package's metadata, which pulls torch.)"""
    path = dest / SDIST
    req = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.loads(urllib.request.urlopen(req, timeout=60).read())["files"]
    entry = next((f for f in files if f["filename"] == SDIST), None)
    if entry is None:
        raise SystemExit(f"{SDIST} is not on {INDEX}")
    if not path.exists():
        data = urllib.request.urlopen(entry["url"], timeout=120).read()
        path.write_bytes(data)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["hashes"]["sha256"]:
        path.unlink()
        raise SystemExit(f"sha256 mismatch for {SDIST}: {digest}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "suffix_decoding"))
    parser.add_argument("--python", default=sys.executable, help="Interpreter the module is built for.")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sdist = fetch_sdist(out)
    src = out / "src"
    shutil.rmtree(src, ignore_errors=True)
    prefix = f"arctic_inference-{VERSION}/"
    wanted = ("csrc/suffix_decoding/", "arctic_inference/suffix_decoding/__init__.py",
              "arctic_inference/suffix_decoding/cache.py", "LICENSE")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(src, members=members, filter="data")

    tools = out / "tools"
    if not (tools / "nanobind").exists():
        subprocess.run([args.python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--target", str(tools), *BUILD_TOOLS], check=True)
    env = {**__import__("os").environ, "PYTHONPATH": str(tools)}
    cmake_dir = subprocess.run([args.python, "-m", "nanobind", "--cmake_dir"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip()
    cmake, ninja = tools / "bin" / "cmake", tools / "bin" / "ninja"
    build = out / "cmake-build"
    subprocess.run([str(cmake), "-S", str(src / "csrc" / "suffix_decoding"), "-B", str(build), "-G", "Ninja",
                    f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DPython_EXECUTABLE={args.python}",
                    f"-Dnanobind_DIR={cmake_dir}", "-DCMAKE_BUILD_TYPE=Release"], env=env, check=True)
    subprocess.run([str(cmake), "--build", str(build), "-j", "2"], env=env, check=True)

    site = out / "site" / "arctic_inference"
    shutil.rmtree(out / "site", ignore_errors=True)
    (site / "suffix_decoding").mkdir(parents=True)
    (site / "__init__.py").write_text("")
    for name in ("__init__.py", "cache.py"):
        shutil.copy(src / "arctic_inference" / "suffix_decoding" / name, site / "suffix_decoding" / name)
    shutil.copy(src / "LICENSE", site / "LICENSE")
    built = sorted(build.glob("_C*.so"))
    if not built:
        raise SystemExit("the build produced no _C module")
    shutil.copy(built[0], site / "suffix_decoding" / built[0].name)
    print(f"built {site / 'suffix_decoding' / built[0].name}")


if __name__ == "__main__":
    main()
