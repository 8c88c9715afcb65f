"""Ray for the extraction job: where to connect, what to ask each backbone actor for, and a
bounded wait for the cluster to place one. Every failure is one line naming the fix.

Conventions (as any Ray program): an explicit --address wins; else RAY_ADDRESS (set by `ray job
submit` and KubeRay); else an embedded local Ray that lives as long as the job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

from maria_extract.ray_compat import autoscaler_node_groups, canonical_address, init_embedded, quiet_ray_data_internals

log = logging.getLogger("maria.extract")  # the CLI prints it; a notebook sees it with logging.basicConfig(level=logging.INFO)

# Ray's longest socket path under its temp dir: session_<date>_<pid>/sockets/plasma_store(.N)
_SOCKET_SUFFIX = "/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store.9"
_SOCKET_LIMIT = 107  # AF_UNIX path limit on Linux, less the terminating byte


class RayClusterError(ValueError):
    """Ray could not be started, reached, or asked for what the job needs; the message names the fix."""


def resolve_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def check_temp_dir(temp_dir: str | None) -> str | None:
    if not temp_dir:
        return None
    path = os.path.abspath(os.path.expanduser(temp_dir))
    budget = _SOCKET_LIMIT - len(_SOCKET_SUFFIX)
    if len(path.encode()) > budget:
        raise RayClusterError(
            f"--ray-temp-dir {path} is {len(path.encode())} bytes; Ray's socket paths under it must "
            f"fit {_SOCKET_LIMIT} bytes, so pass a folder of at most {budget} bytes (e.g. /tmp/ray-maria)"
        )
    return path


def init_ray(address: str | None, temp_dir: str | None, num_cpus: int | None = None) -> bool:
    """Connect to a cluster (address, else RAY_ADDRESS) or start an embedded one. True when this
    call started or connected Ray (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    given, address = address, resolve_address(address)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # ray.init replaces the SIGTERM handler with sys.exit(15); a caller's own (the CLI's: SIGTERM is an
    # interruption, exit 130 and a re-run line) is put back
    term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address:  # worker output goes to this driver, so `ray job logs` shows progress and errors
            _check_reachable(address)
            ray.init(address=address, log_to_driver=True, configure_logging=False)
            source = "--address" if address == given else "RAY_ADDRESS"
            log.info(f"maria extract: on the Ray cluster at {address} (from {source})")
        else:
            temp = check_temp_dir(temp_dir)
            init_embedded(num_cpus or max(2, os.cpu_count() or 2), temp)
    except RayClusterError:
        raise
    except Exception as e:  # noqa: BLE001 -- Ray's start/connect errors are pages; name the fix in one line
        raise RayClusterError(_start_failure(address, temp_dir, e)) from None
    finally:
        if callable(term):
            signal.signal(signal.SIGTERM, term)
    return True


def quiet_ray_data() -> None:
    """Our progress lines say what Ray Data's info log would; and a failed task is logged with its
    traceback before the error reaches the driver, which re-raises it as one line (or, for a bug,
    with its traceback)."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
    quiet_ray_data_internals()


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """ray.init waits minutes on an address where no cluster listens; a TCP connect says so in seconds.
    "auto" is resolved as Ray resolves it (the last `ray start` on this machine, else a running one)."""
    import socket

    if "://" in address:  # Ray Client (ray://) and the like: ray.init's own checks
        return
    host, port = canonical_address(address).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


def _start_failure(address: str | None, temp_dir: str | None, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if address:
        return (
            f"cannot connect to the Ray cluster at {address!r} ({first}); start one with `ray start --head`, "
            f"fix --address / RAY_ADDRESS, or unset both for an embedded local Ray"
        )
    if "AF_UNIX" in str(e) or "socket" in first.lower():
        return f"Ray could not create its sockets ({first}); pass a short --ray-temp-dir such as /tmp/ray-maria"
    return f"cannot start an embedded Ray ({first}); check --ray-temp-dir {temp_dir or '(default /tmp/ray)'} is writable"


# --- what each backbone actor asks for, and whether the cluster can ever give it ------------------


@dataclass
class ActorRequest:
    num_cpus: float
    num_gpus: float
    memory: int | None  # bytes, or None for no reservation

    def ray_args(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, **({"memory": self.memory} if self.memory else {})}

    def as_resources(self) -> dict:
        return {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory or 0}

    def describe(self) -> str:
        mem = f", {self.memory / 2**30:g} GiB memory" if self.memory else ""
        return f"{self.num_gpus:g} GPU and {self.num_cpus:g} CPU{mem} per backbone actor"


def cluster_shapes() -> tuple[list[dict], list[dict] | None]:
    """(resources of each live node, resources of each node type the autoscaler may still add,
    or None when the cluster reports no autoscaler)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return nodes, autoscaler_node_groups()


def fits(request: dict, node: dict) -> bool:
    return all(node.get(k, 0) >= v for k, v in request.items() if v)


def gpus_available(nodes: list[dict], groups: list[dict] | None) -> bool:
    return any(n.get("GPU", 0) > 0 for n in nodes + (groups or []))


def _largest(nodes: list[dict]) -> str:
    if not nodes:
        return "no worker nodes"
    best = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0), n.get("memory", 0)))
    return f"{len(nodes)} node(s), the largest with {best.get('GPU', 0):g} GPU, {best.get('CPU', 0):g} CPU, {best.get('memory', 0) / 2**30:.0f} GiB memory"


def unsatisfiable(req: ActorRequest, nodes: list[dict], groups: list[dict] | None, embedded: bool) -> str | None:
    """Why no node now or later can host one actor, or None when one can (or may, on a cluster
    whose autoscaler we cannot see)."""
    want = req.as_resources()
    if any(fits(want, n) for n in nodes) or (groups is not None and any(fits(want, g) for g in groups)):
        return None
    if groups is None and not embedded:
        return None  # an autoscaler we cannot see may still add a node: the bounded wait decides
    more = "" if groups is None else f"; its autoscaler can add: {_largest(groups)}"
    return f"the job asks for {req.describe()}; the cluster has {_largest(nodes)}{more}. {_fix(req)}"


def _fix(req: ActorRequest) -> str:
    if req.num_gpus:
        return "Pass --device cpu (or --actor-gpus 0) for a CPU-only cluster, or add GPU nodes"
    return "Pass smaller --actor-cpus / --actor-memory-gb, or add bigger nodes"


def _probe() -> list:
    """Runs with an actor's resources: proof the cluster can place one (and which GPUs it got)."""
    import ray

    return ray.get_gpu_ids()


def wait_for_placement(req: ActorRequest, timeout_s: float, embedded: bool) -> None:
    """Fail fast when no node can ever host an actor; else wait at most timeout_s for the cluster
    (an autoscaler adding a GPU node takes minutes) to place one."""
    import ray

    nodes, groups = cluster_shapes()
    reason = unsatisfiable(req, nodes, groups, embedded)
    if reason:
        raise RayClusterError(reason)
    ref = ray.remote(_probe).options(**req.ray_args(), max_retries=0).remote()
    start = time.monotonic()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        nodes, groups = cluster_shapes()
        raise RayClusterError(
            f"the cluster placed no backbone actor within {time.monotonic() - start:.0f} s: the job asks "
            f"for {req.describe()}; the cluster has {_largest(nodes)}. {_fix(req)}, or raise "
            f"--actor-start-timeout-s if nodes are still being added"
        )
    ray.get(ref)
