"""shoal on a Ray cluster (the `shoal[ray]` extra): data-parallel replicas, each a whole engine with its own
weights and KV pool. `build_processor` maps a Ray Dataset; `ReplicaPool` answers batch lines for
`shoal batch --ray`. Outputs depend only on prompt, parameters and seed, so they match one process."""

from shoal.ray.cluster import connect
from shoal.ray.data import build_processor
from shoal.ray.replicas import ReplicaPool

__all__ = ["ReplicaPool", "build_processor", "connect"]
