"""Builds the wheel, installs it non-editable into a fresh venv outside the checkout and serves from it.

  .venv/bin/python tools/check_wheel.py --lock requirements/core.txt

Checks, in order, each failing with a message that names what is wrong:
1. every module under agentinfer_jax/, kernels/ and configs/ (as agentinfer_jax.kernels/.configs)
   and every bundled asset is in the wheel;
2. the installed package is the one imported (not the checkout) and `agentinfer-serve --help` runs;
3. `agentinfer-serve --config tiny` on 127.0.0.1 answers one chat completion within --timeout
   seconds, then is stopped by its PID.
The editable install of `make test` hides a wheel that leaves files out; this does not.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject's package-dir).
SOURCE_ROOTS = {"agentinfer_jax": "agentinfer_jax", "kernels": "agentinfer_jax/kernels",
                "configs": "agentinfer_jax/configs"}

# Left by earlier builds, venvs and runs; never part of a build from a fresh clone.
BUILD_LEFTOVERS = (".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                   ".pytest_cache", ".hypothesis", "results")


def expected_files() -> set[str]:
    """Wheel paths of every module of every package on disk, and of every asset."""
    want = set()
    for src, dst in SOURCE_ROOTS.items():
        for init in (ROOT / src).rglob("__init__.py"):
            pkg = init.parent
            if "__pycache__" in pkg.parts:
                continue
            rel = pkg.relative_to(ROOT / src)
            want |= {(pathlib.PurePosixPath(dst) / rel / f.name).as_posix() for f in pkg.glob("*.py")}
    assets = ROOT / "agentinfer_jax" / "assets"
    want |= {f"agentinfer_jax/assets/{f.relative_to(assets).as_posix()}" for f in assets.rglob("*")
             if f.is_file()}
    return want


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_once(port: int, proc: subprocess.Popen, timeout_s: float) -> dict:
    """Waits for /health, then sends one chat completion; raises if the server dies or time runs out."""
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not ready after {timeout_s:.0f} s")
        time.sleep(0.5)
    body = json.dumps({"model": "tiny", "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "Which city is the capital of France?"}]})
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=max(5.0, deadline - time.monotonic())) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lock", default=str(ROOT / "requirements" / "core.txt"),
                    help="pinned runtime dependencies to install beside the wheel")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for start-up plus one completion")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = ap.parse_args()

    uv = shutil.which("uv", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        print("check_wheel: uv not found (make installs it into .venv)", file=sys.stderr)
        return 2
    find_links = ["--find-links", "/opt/wheels"] if pathlib.Path("/opt/wheels").is_dir() else []
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="agentinfer-wheel-"))
    try:
        # 1. Build from a clean copy (setuptools reuses a stale build/ folder) and inspect.
        src = tmp / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
        run([uv, "build", "-q", "--wheel", "--out-dir", str(tmp / "dist"), str(src)])
        wheel = next((tmp / "dist").glob("*.whl"))
        names = set(zipfile.ZipFile(wheel).namelist())
        missing = sorted(expected_files() - names)
        if missing:
            print(f"check_wheel: {wheel.name} lacks {len(missing)} files, e.g.:", *missing[:20],
                  sep="\n  ", file=sys.stderr)
            return 1
        print(f"check_wheel: {wheel.name}: all {len(expected_files())} modules and assets present")

        # 2. Install into a fresh venv outside the checkout; run from a folder outside it too.
        venv = tmp / "venv"
        run([uv, "venv", "-q", "--python", sys.executable, str(venv)])
        py = venv / "bin" / "python"
        run([uv, "pip", "install", "-q", "--python", str(py), *find_links, "-r", args.lock, str(wheel)])
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["JAX_PLATFORMS"] = "cpu"
        where = run([str(py), "-c", "import agentinfer_jax; print(agentinfer_jax.__file__)"],
                    cwd=tmp, env=env, capture_output=True).stdout.strip()
        if not pathlib.Path(where).resolve().is_relative_to(venv.resolve()):
            print(f"check_wheel: agentinfer_jax imported from {where}, not the venv", file=sys.stderr)
            return 1
        # AgentSAM's numba kernels compile (and cache) inside the installed package.
        run([str(py), "-c", "from agentinfer_jax.speculation import SAMDrafter, SessionMemory\n"
             "with SessionMemory() as m:\n d = SAMDrafter(m); d.begin('r', [1, 2, 1, 2], 's')\n"
             " assert d.propose('r', 2) == [1, 2]; d.end('r'); m.flush()"], cwd=tmp, env=env)
        serve = venv / "bin" / "agentinfer-serve"
        run([str(serve), "--help"], cwd=tmp, env=env, stdout=subprocess.DEVNULL)

        # 3. Serve one chat completion, then stop the server by its PID.
        port = free_port()
        log = open(tmp / "server.log", "w")
        proc = subprocess.Popen([str(serve), "--config", "tiny", "--host", "127.0.0.1", "--port", str(port),
                                 "--log-level", "warning"], cwd=tmp, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            reply = chat_once(port, proc, args.timeout)
        except Exception as e:  # noqa: BLE001 - report any failure with the server's log
            log.flush()
            print(f"check_wheel: serving failed: {e!r}\n--- server log ---\n"
                  f"{(tmp / 'server.log').read_text()[-4000:]}", file=sys.stderr)
            return 1
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        choice = reply["choices"][0]
        if choice["message"]["role"] != "assistant" or reply["usage"]["completion_tokens"] < 1:
            print(f"check_wheel: unexpected reply {reply}", file=sys.stderr)
            return 1
        print(f"check_wheel: installed wheel served a chat completion ({reply['usage']['completion_tokens']} "
              f"tokens, finish {choice['finish_reason']!r}) in {time.monotonic() - t0:.1f} s; "
              f"server {proc.pid} stopped")
        return 0
    finally:
        if args.keep:
            print(f"check_wheel: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
