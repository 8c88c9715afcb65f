"""The Ray adapter: every use of Ray that reaches past its public API. An upgrade that breaks one breaks
it here, and tests/test_adapters.py names the call that went away.

Why each is needed: Ray offers no public way to (1) resolve "auto" / host:port the way ray.init will,
(2) read the autoscaler's node types (what the cluster can still add), (3) put an embedded Ray's temp
folder somewhere else (ray.init's `_temp_dir`), (4) quiet Ray Data's internal loggers, (5) drop one
issue detector, (6) open a file of a FileBasedDatasource for random access (parquet's footer).
"""

from __future__ import annotations

import logging

import ray
from ray.data.datasource import FileBasedDatasource

RAY_DATA_INTERNAL_LOGGERS = ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor_state")


def canonical_address(address: str) -> str:
    """host:port of a bootstrap address ("auto": the last `ray start` on this machine, else a running one)."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def autoscaler_node_groups() -> list[dict] | None:
    """Resources of each node type the autoscaler may still add (max_count != 0), or None when the
    cluster reports no autoscaler (then nobody knows what it may add)."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 -- an older GCS or no autoscaler state: unknown
        return None
    if config is None or not config.node_group_configs:
        return None
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]


def init_embedded(num_cpus: int, temp_dir: str | None) -> None:
    """A local Ray for this process alone, its sessions and sockets under temp_dir (default /tmp/ray)."""
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )


def quiet_ray_data_internals() -> None:
    """Ray Data's progress-bar notice and its per-task error pages: our own lines say the same."""
    logging.getLogger(RAY_DATA_INTERNAL_LOGGERS[0]).setLevel(logging.ERROR)
    logging.getLogger(RAY_DATA_INTERNAL_LOGGERS[1]).setLevel(logging.CRITICAL)


def drop_high_memory_detector(ctx) -> None:
    """Without a memory reservation Ray's high-memory issue detector logs a page every 30 s."""
    config = ctx.issue_detectors_config
    config.detectors = [d for d in config.detectors if "HighMemory" not in d.__name__]


class RandomAccessDatasource(FileBasedDatasource):
    """A FileBasedDatasource whose files open for random access when `random_access(path)` says so
    (parquet keeps its footer at the end), and as Ray's decompressing stream otherwise."""

    def random_access(self, path: str) -> bool:
        return False

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self.random_access(path):
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)
