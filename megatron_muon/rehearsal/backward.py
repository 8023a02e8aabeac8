"""The backward pass of the GPU rehearsal, walked in Python.

torch's C++ autograd engine asks the CUDA driver about the device of every CUDA gradient (primary context, streams)
even when the tensors are fake, so on a machine without a GPU ``torch.autograd.backward`` of a fake CUDA loss fails
before the first node runs. :func:`backward` does what the engine does, for the graphs a training step builds: it
walks the ``grad_fn`` graph in dependency order, calls each node (C++ nodes directly, ``autograd.Function`` nodes
through their ``backward``), sums the gradients that meet at a node, and accumulates into leaves with their
post-accumulate hooks, including megatron DDP's (``grad_acc.register_hook`` cannot be read back from Python, so the
DDP chunks are asked for their hook). Every op inside still dispatches through the fake mode, so devices, dtypes,
shapes, collectives and host syncs of the backward are checked as in the forward.

Not modelled (the training step does not use them): ``retain_grad``, tensor hooks on non-leaf tensors,
``create_graph``, anomaly mode, reentrant checkpointing.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["backward", "python_autograd"]


def _zeros_for(metadata: Any) -> torch.Tensor:
    return torch.zeros(metadata.shape, dtype=metadata.dtype, device=metadata.device)


def _validated(grad: torch.Tensor, node: Any, slot: int) -> torch.Tensor:
    """As the engine's ``validate_outputs``: a gradient is summed to the shape and cast to the dtype its consumer
    recorded for that input (a broadcast bias receives the unreduced gradient of its output)."""
    metadata = node._input_metadata[slot] if slot < len(node._input_metadata) else None
    if metadata is None:
        return grad
    shape = torch.Size(metadata.shape)
    if grad.shape != shape:
        grad = grad.sum_to_size(shape)
    if grad.dtype != metadata.dtype:
        grad = grad.to(metadata.dtype)
    return grad


def _call_node(node: Any, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Run one node on the gradients of its outputs; returns one gradient per ``next_functions`` edge."""
    if not hasattr(node, "_forward_cls"):  # a C++ node: one result per edge
        result = node(*grads)
        return list(result) if isinstance(result, tuple) else [result]
    # An autograd.Function: missing grads are zeros (materialize_grads), and its backward returns one gradient
    # per forward input while its edges are one per tensor input, empty for a tensor without grad. So the
    # non-empty edges, in order, are the inputs with needs_input_grad, in order.
    full = [g if g is not None else _zeros_for(m) for g, m in zip(grads, node._input_metadata, strict=True)]
    result = node._forward_cls.backward(node, *full)
    result = result if isinstance(result, tuple) else (result,)
    needed = iter(g for g, need in zip(result, node.needs_input_grad, strict=False) if need)
    return [next(needed, None) if edge is not None else None for edge, _ in node.next_functions]


def backward(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    grad_tensors: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Any = None,
    *,
    leaf_hooks: Callable[[torch.Tensor], Sequence[Callable[[], Any]]] = lambda leaf: (),
    tensor_hooks: dict[Any, dict[int, list[Callable[[torch.Tensor], Any]]]] | None = None,
    final_callbacks: list[Callable[[], Any]] | None = None,
) -> None:
    """``torch.autograd.backward`` without the C++ engine (signature compatible; ``create_graph`` and ``inputs``
    are refused). ``leaf_hooks(param)`` gives the hooks to call after a gradient is accumulated into ``param``;
    ``tensor_hooks[node][output]`` the hooks registered on the non-leaf tensor ``node`` made (called on its
    gradient before ``node`` runs, as the engine's tensor pre-hooks); ``final_callbacks`` collects what the
    backward queues for its end (``queue_callback``) and runs it then."""
    del retain_graph
    if create_graph or inputs is not None:
        raise NotImplementedError("the rehearsal's backward supports neither create_graph nor inputs")
    roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if grad_tensors is None:
        grads: list[torch.Tensor | None] = [None] * len(roots)
    elif isinstance(grad_tensors, torch.Tensor):
        grads = [grad_tensors]
    else:
        grads = list(grad_tensors)
    root_grads = [torch.ones_like(t) if g is None else g for t, g in zip(roots, grads, strict=True)]

    buffers: dict[Any, dict[int, torch.Tensor]] = defaultdict(dict)

    def add(node: Any, slot: int, grad: torch.Tensor | None) -> None:
        if grad is None:
            return
        grad = _validated(grad, node, slot)
        held = buffers[node]
        held[slot] = grad if slot not in held else held[slot] + grad

    starts: list[Any] = []  # autograd nodes (AccumulateGrad's ``variable`` is not in torch's stubs)
    for tensor, grad in zip(roots, root_grads, strict=True):
        if tensor.grad_fn is not None:
            add(tensor.grad_fn, tensor.output_nr, grad)
            starts.append(tensor.grad_fn)
        elif tensor.requires_grad:
            _accumulate(tensor, grad, leaf_hooks)
    # Dependencies: how many edges point at each node from nodes reachable from the roots.
    dependencies: dict[Any, int] = defaultdict(int)
    seen: set[Any] = set()
    pending = list(starts)
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        for next_node, _ in node.next_functions:
            if next_node is not None:
                dependencies[next_node] += 1
                pending.append(next_node)
    ready = [node for node in dict.fromkeys(starts) if dependencies[node] == 0]
    while ready:
        node = ready.pop()
        held = buffers.pop(node, {})
        if type(node).__name__ == "AccumulateGrad":
            if 0 in held:
                _accumulate(node.variable, held[0], leaf_hooks)
            continue
        for slot, hooks in (tensor_hooks or {}).get(node, {}).items():
            for hook in hooks:
                if slot in held:
                    replaced = hook(held[slot])
                    if replaced is not None:
                        held[slot] = replaced
        count = len(node._input_metadata)
        outputs = _call_node(node, [held.get(slot) for slot in range(count)]) if held else []
        for index, (next_node, slot) in enumerate(node.next_functions):
            if next_node is None:
                continue
            if index < len(outputs):
                add(next_node, slot, outputs[index])
            dependencies[next_node] -= 1
            if dependencies[next_node] == 0:
                ready.append(next_node)
    while final_callbacks:
        final_callbacks.pop(0)()


def _accumulate(
    leaf: torch.Tensor,
    grad: torch.Tensor,
    leaf_hooks: Callable[[torch.Tensor], Sequence[Callable[[], Any]]],
) -> None:
    with torch.no_grad():
        leaf.grad = grad.detach() if leaf.grad is None else leaf.grad + grad
    for hook in getattr(leaf, "_post_accumulate_grad_hooks", None) or {}:
        leaf._post_accumulate_grad_hooks[hook](leaf)
    for hook in leaf_hooks(leaf):
        hook()


@contextlib.contextmanager
def python_autograd(model_chunks: Sequence[Any] = ()) -> Iterator[None]:
    """Inside: ``torch.autograd.backward`` is :func:`backward`, with megatron DDP's grad-ready hook of each
    parameter of the megatron ``DistributedDataParallel`` chunks among ``model_chunks`` called after its
    accumulation; hooks registered on non-leaf tensors inside (FSDP2's pre-backward all-gather) and callbacks
    queued for the end of a backward (FSDP2's final reduce-scatter wait) run where the engine would run them."""
    hooks: dict[int, Callable[[], Any]] = {}
    for chunk in model_chunks:
        make_hook = getattr(chunk, "_make_backward_post_hook", None)
        if make_hook is None:  # not megatron DDP (FSDP: its hooks are tensor hooks and autograd functions)
            continue
        for param in chunk.module.parameters():
            if param.requires_grad:
                hooks[id(param)] = make_hook(param)

    def leaf_hooks(leaf: torch.Tensor) -> Sequence[Callable[[], Any]]:
        hook = hooks.get(id(leaf))
        return (hook,) if hook is not None else ()

    tensor_hooks: dict[Any, dict[int, list[Callable[[torch.Tensor], Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    final_callbacks: list[Callable[[], Any]] = []
    original_register_hook: Callable[[torch.Tensor, Callable[[torch.Tensor], Any]], Any] = (
        torch.Tensor.register_hook
    )

    def register_hook(tensor: torch.Tensor, hook: Callable[[torch.Tensor], Any]) -> Any:
        handle = original_register_hook(tensor, hook)
        if tensor.grad_fn is not None:  # a non-leaf tensor: the walk calls it (leaves: leaf_hooks)
            registered = tensor_hooks[tensor.grad_fn][tensor.output_nr]
            registered.append(hook)
            return _RemovableHook(handle, registered, hook)
        return handle

    engine = torch.autograd.Variable._execution_engine
    original_backward = torch.autograd.backward
    torch.autograd.backward = lambda *args, **kwargs: backward(
        *args, **kwargs, leaf_hooks=leaf_hooks, tensor_hooks=tensor_hooks, final_callbacks=final_callbacks
    )
    torch.Tensor.register_hook = register_hook  # type: ignore[method-assign]
    # ignore[assignment]: a stand-in for torch's C++ engine object, which mypy knows as _ImperativeEngine.
    torch.autograd.Variable._execution_engine = _QueueingEngine(engine, final_callbacks)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.autograd.backward = original_backward
        torch.Tensor.register_hook = original_register_hook  # type: ignore[method-assign]
        torch.autograd.Variable._execution_engine = engine


class _QueueingEngine:
    """torch's engine object with ``queue_callback`` collecting into the walk's final callbacks (the C++ object's
    attribute is read-only, so it is stood in for as ``Variable._execution_engine``)."""

    def __init__(self, engine: Any, callbacks: list[Callable[[], Any]]) -> None:
        self._engine, self.queue_callback = engine, callbacks.append

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class _RemovableHook:
    """The handle of a hook registered inside :func:`python_autograd`: removing it removes both registrations."""

    def __init__(self, handle: Any, registered: list[Any], hook: Any) -> None:
        self._handle, self._registered, self._hook = handle, registered, hook

    def remove(self) -> None:
        self._handle.remove()
        if self._hook in self._registered:
            self._registered.remove(self._hook)
