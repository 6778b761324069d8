"""Finding the CUDA toolkit, shared by setup.py and tools/cmake_configure.py (no torch import)."""

import os
import re
import shutil
import subprocess


def find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, else the TOP that `nvcc --dryrun` reports (nvcc may be a
    wrapper script outside the toolkit), else two levels above nvcc's real path, else None."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if match:
            return os.path.normpath(match.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvcc_major_version(cuda_home):
    """Major version of the toolkit's nvcc, or None when it cannot be run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None
