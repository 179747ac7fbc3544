"""cxrcae.allocator: applied once per process, opt-out honoured, harmless where it cannot apply."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_SNIPPET = (
    "from cxrcae import allocator as a; import torch; "
    "first = a.keep_freed_memory(); x = torch.ones(20_000_000); del x; "
    "print(first, a.keep_freed_memory(), a.status())"
)


def _run(env_value: str | None) -> list[str]:
    env = dict(os.environ)
    env.pop("CXRCAE_ALLOCATOR", None)
    if env_value is not None:
        env["CXRCAE_ALLOCATOR"] = env_value
    cmd = [sys.executable, "-c", _SNIPPET]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only"
)
def test_kept_on_glibc_and_idempotent():
    assert _run(None) == ["True", "True", "kept"]


def test_opt_out_leaves_the_system_allocator():
    assert _run("system") == ["False", "False", "system"]
