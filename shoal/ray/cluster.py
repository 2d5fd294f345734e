"""Joining a Ray cluster, or starting a local one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise ShoalError("Ray is not installed: pip install 'shoal[ray]'") from None
    return ray


def connect(address: str, num_cpus: int | None = None) -> Any:
    """`address` "local" starts a Ray instance on this machine (num_cpus: its CPUs, default all); anything
    else is a running cluster's address ("auto", "ray://head:10001", "10.0.0.5:6379")."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    # Workers import shoal from wherever this process does (a checkout, or site-packages).
    env = {
        "env_vars": {
            "PYTHONPATH": os.pathsep.join(p for p in [_shoal_root(), os.environ.get("PYTHONPATH")] if p)
        }
    }
    if address == "local":
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=env)
    else:
        ray.init(address=address, runtime_env=env)
    return ray


def node_id() -> str:
    """The Ray node this process runs on (inside a Ray worker), or "" outside Ray."""
    try:
        import ray
    except ImportError:
        return ""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _shoal_root() -> str:
    """The folder holding the shoal package."""
    return str(Path(__file__).resolve().parents[2])
