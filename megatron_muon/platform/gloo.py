"""One gloo device per process, shared by all of its gloo process groups.

torch gives every gloo process group a device of its own (``ProcessGroupGloo(store, rank, size, timeout)``), and
every gloo TCP device runs a thread (``gloo_tcp_loop``) that polls its sockets with a 10 ms timeout, so it wakes 100
times a second whether or not anything is sent. Megatron-core creates about 24 groups per rank for the small
layouts (more with expert and pipeline parallelism): an idle rank spent ~3.5 % of a core on those wake-ups on a
quiet 2-core machine, and among the test suite's ~30 runnable processes ``perf`` put ~40 % of all CPU samples in
them. A gloo device serves any number of process groups (each group's pairs are its own; the device only owns the
sockets' event loop), and ``ProcessGroupGloo`` takes its devices in its options: :func:`share_one_gloo_device`
makes torch's gloo backend build every group of this process on one device, chosen as torch chooses it
(``GLOO_SOCKET_IFNAME`` when set, else the host name's interface), with torch's default of two worker threads per
device.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["share_one_gloo_device"]

_devices: list[Any] | None = None  # this process's gloo devices, made on the first group


def _gloo_devices() -> list[Any]:
    """The devices torch's own constructor would make for a group, made once per process."""
    global _devices
    if _devices is None:
        from torch.distributed import ProcessGroupGloo

        interfaces = [name for name in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
        _devices = (
            [ProcessGroupGloo.create_device(interface=name) for name in interfaces]
            if interfaces
            else [ProcessGroupGloo.create_default_device()]
        )
    return _devices


def _create_gloo_group_on_the_shared_device(opts: Any, backend_options: object | None) -> Any:
    """torch's gloo creator (``distributed_c10d._create_gloo_process_group``) with the process's devices."""
    from torch.distributed import ProcessGroupGloo

    options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # in torch's C++ bindings, not its stubs
    options._devices = _gloo_devices()
    options._threads = 2 * len(options._devices)  # torch's default for a group of its own
    options._timeout = opts.timeout
    options.enable_reconfigure = opts.enable_reconfigure
    group = ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, options)
    group.options.global_ranks_in_group = opts.global_ranks_in_group
    group.options.group_name = opts.group_id
    return group


def share_one_gloo_device() -> None:
    """From now on, gloo process groups of this process share one gloo device (idempotent). Raises
    ``RuntimeError`` naming what is missing if this torch registers its gloo backend differently."""
    from torch.distributed import Backend, is_gloo_available

    if not is_gloo_available():
        return
    ensure_registered = getattr(Backend, "_ensure_backend_registered", None)
    if ensure_registered is not None:
        ensure_registered("gloo")  # torch 2.14 registers its built-in backends on first use (entry points)
    plugins = getattr(Backend, "_plugins", None)
    if not isinstance(plugins, dict):
        plugins = {}
    plugin = plugins.get("GLOO")
    if plugin is None or not hasattr(plugin, "_replace") or not getattr(plugin, "extended_api", False):
        raise RuntimeError(
            "torch.distributed.Backend._plugins['GLOO'] (an extended-API creator) is not where torch 2.14 keeps it: "
            "the shared gloo device (megatron_muon/platform/gloo.py) needs updating for this torch"
        )
    if plugin.creator_fn is not _create_gloo_group_on_the_shared_device:
        plugins["GLOO"] = plugin._replace(creator_fn=_create_gloo_group_on_the_shared_device)
