"""The native module against its stub (python/ilias/_core.pyi): every name, signature (parameter
names, kinds, defaults) and constant value, checked by mypy's stubtest on the built module, so that
the stub cannot drift from rust/python.rs."""

import os
import subprocess
import sys

import ilias._core

# names stubtest may not check, each with its reason (keep it empty where possible)
ALLOWLIST: dict[str, str] = {}


def test_the_stub_matches_the_native_module(tmp_path):
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text("".join(f"{name}  # {why}\n" for name, why in ALLOWLIST.items()))
    env = {**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "mypy-cache")}
    run = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "ilias._core", "--allowlist", str(allowlist)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, f"stubtest (pip install mypy) found differences:\n{run.stdout}{run.stderr}"


def test_every_function_carries_its_signature():
    # stubtest compares signatures only where the module exposes them (pyo3 does, as
    # __text_signature__); a function without one would escape the check above
    for name in ilias._core.__all__:
        obj = getattr(ilias._core, name)
        if callable(obj) and not isinstance(obj, type):
            assert obj.__text_signature__, name
