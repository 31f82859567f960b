"""The trainers' torch.distributed process group, listening on the node's cluster address
only.

Ray Train's own set-up (`TorchConfig`) rendezvouses through env:// and lets rank 0's
torch TCPStore open its server socket, which binds every interface ("::") whatever
MASTER_ADDR says. `NodeAddressTorchConfig` keeps Ray Train's flow (the same worker group,
the same gloo/nccl choice and timeout) but rank 0 binds the store's socket itself on the
address Ray knows its node by, and hands the listening socket to the store
(`TCPStore(master_listen_fd=...)`); gloo's pairs are pinned to that address's interface
(GLOO_SOCKET_IFNAME, unless already set). On the local stack every node is 127.0.0.1, so
training opens nothing beyond the loopback interface; on a cluster it listens on the
node's cluster address, not on every interface of the machine.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

logger = logging.getLogger(__name__)

# How long leaving the process group may take when a run ends (a crashed peer can hang it).
_SHUTDOWN_TIMEOUT_S = 30

# The socket rank 0 opened, kept in its worker process until the store takes it over.
_listener: socket.socket | None = None


class NodeAddressTorchConfig(TorchConfig):
    """A `TorchConfig` whose process group listens on the node's cluster address only;
    pass it as `TorchTrainer(torch_config=...)`. Its fields are TorchConfig's (backend,
    timeout_s); `init_method` is not used: the store is made here."""

    @property
    def backend_cls(self):
        return NodeAddressBackend


class NodeAddressBackend(Backend):
    """Ray Train backend that sets up torch.distributed from a store bound by rank 0 on
    its node's address (see the module's docstring)."""

    # As Ray's torch backend: workers on a node see all its GPUs given to the run.
    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: NodeAddressTorchConfig) -> None:
        backend = backend_config.backend or "gloo"
        addr, port = worker_group.execute_single(0, open_store_socket)
        world_size = len(worker_group)
        ray.get([
            worker_group.execute_single_async(
                rank, join_process_group, backend=backend, addr=addr, port=port,
                world_rank=rank, world_size=world_size, timeout_s=backend_config.timeout_s,
            )
            for rank in range(world_size)
        ])  # fmt: skip

    def on_shutdown(self, worker_group, backend_config) -> None:
        try:
            ray.get(worker_group.execute_async(leave_process_group), timeout=_SHUTDOWN_TIMEOUT_S)
        except GetTimeoutError:
            logger.warning("leaving the process group took over %d s", _SHUTDOWN_TIMEOUT_S)


def open_store_socket() -> tuple[str, int]:
    """On rank 0: a listening TCP socket on this node's Ray address and a free port, kept
    for `join_process_group`. Returns (address, port)."""
    global _listener
    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((addr, 0))
    sock.listen(128)
    _listener = sock
    return addr, sock.getsockname()[1]


def join_process_group(
    backend: str, addr: str, port: int, world_rank: int, world_size: int, timeout_s: float
) -> None:
    """Create the store (rank 0 serves it on the socket `open_store_socket` made; the
    others connect to addr:port) and initialise torch.distributed's default group.
    Sets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) too,
    for libraries that read them."""
    global _listener
    rank = world_rank
    context = ray.train.get_context()
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(context.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "NODE_RANK": str(context.get_node_rank()),
        "MASTER_ADDR": addr, "MASTER_PORT": str(port),
    })  # fmt: skip
    interface = interface_of(ray.util.get_node_ip_address())
    if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        listener, _listener = _listener, None
        if listener is None:
            raise RuntimeError("the store's socket was not opened on rank 0")
        # The store owns the descriptor from here on and closes it.
        store = dist.TCPStore(addr, port, world_size, True, timeout,
                              master_listen_fd=listener.detach())  # fmt: skip
    else:
        store = dist.TCPStore(addr, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)  # fmt: skip


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def interface_of(address: str) -> str | None:
    """The name of the network interface that carries `address` (e.g. "lo" for
    127.0.0.1), or None when no interface does."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None
