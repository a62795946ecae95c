"""memkern layers under FSDP2 (``torch.distributed.fsdp.fully_shard``) and
torch.distributed.checkpoint (DCP); docs/fsdp.md says what travels and the N -> M recipe.

* :func:`prepare_for_fully_shard`: FSDP2 shards contiguous parameters only, and a
  block-sparse ``SparseLinear`` keeps its ``values`` in the row-panel layout (a permuted
  view the CPU kernel hands to BLAS without packing). This gives them the plain layout, which
  every kernel also reads. Call it before ``fully_shard`` (``shard_model`` does).
* :func:`shard_model`: ``fully_shard`` on every module of the given types, then on the root.
* :func:`load`: DCP load of a model's state that checks it (as ``load_state_dict`` does)
  before the model changes, on any number of ranks or in one process.

Saving needs no helper: ``torch.distributed.checkpoint.save(model.state_dict(), checkpoint_id=path)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from memkern.nn import SparseLinear
from memkern.nn.sparse import is_sharded


def prepare_for_fully_shard(model: nn.Module) -> nn.Module:
    """Give every ``SparseLinear`` of ``model`` contiguous ``values`` (FSDP2 refuses a
    strided parameter), keeping their contents and ``requires_grad``; returns ``model``.

    Build the optimiser after this and ``fully_shard`` (both replace the parameters). The
    unsharded ``values`` an all-gather produces are contiguous anyway, so this costs nothing
    more under FSDP2; on one process the CPU kernel then packs the blocks per call.
    """
    for layer in model.modules():
        if isinstance(layer, SparseLinear) and not layer.values.is_contiguous():
            layer.values = nn.Parameter(layer.values.detach().contiguous(), requires_grad=layer.values.requires_grad)
    return model


def shard_model(
    model: nn.Module,
    mesh=None,
    *,
    layer_types: Iterable[type[nn.Module]] = (SparseLinear,),
    reshard_after_forward: bool | int = True,
    **fully_shard_kwargs,
) -> nn.Module:
    """``fully_shard`` every module of ``layer_types`` in ``model`` (innermost first), then
    ``model`` itself, after :func:`prepare_for_fully_shard`; returns ``model``.

    Args:
        mesh: the ``DeviceMesh`` to shard over (default: FSDP2's, all ranks of the default
            process group).
        layer_types: the modules that get their own all-gather, usually the model's
            transformer block class. ``SparseLinear`` by default; the quantised layers
            (``Int8Linear``, ...) hold only a bias as parameter, so their own group would
            all-gather a few bytes: leave them to the enclosing one.
        reshard_after_forward: for the per-layer groups (the root keeps its parameters
            gathered until backward, as FSDP2 does). ``True``: free the gathered weights
            after forward and gather them again for backward (least memory, two all-gathers
            a step). ``False``: keep them until backward (one all-gather). An ``int``:
            keep them resharded over that many ranks (e.g. the ranks of one node).
        fully_shard_kwargs: passed to every ``fully_shard`` call, e.g. ``mp_policy``
            (``MixedPrecisionPolicy``: casts floating-point parameters only; int8 weights
            are buffers and never cast), ``offload_policy``.
    """
    from torch.distributed.fsdp import fully_shard

    prepare_for_fully_shard(model)
    types = tuple(layer_types)
    # Children before parents: fully_shard on a parent then leaves the children's
    # parameters to their own groups.
    for module in reversed(list(model.modules())):
        if module is not model and isinstance(module, types):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def load(model: nn.Module, checkpoint_id: str | os.PathLike, *, storage_reader=None, strict: bool = True):
    """Load a DCP checkpoint (saved from any number of ranks) into ``model``, sharded by
    ``fully_shard`` on any number of ranks or not sharded in one process (no process group
    needed); returns ``load_state_dict``'s result.

    The checkpoint is read into new tensors and handed to ``model.load_state_dict``, so a
    ``SparseLinear``'s index is checked (a checkpoint is untrusted input) before it replaces
    the layer's: a plain ``dcp.load(model.state_dict(), ...)`` writes into the model's own
    tensors first. A layer that is not sharded takes the checkpoint's layout (number of kept
    blocks, element mask); a sharded one must already have it (load the checkpoint, or the
    one-process state it came from, before ``fully_shard``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = storage_reader if storage_reader is not None else dcp.FileSystemReader(os.fspath(checkpoint_id))
    saved = reader.read_metadata().state_dict_metadata
    model_state = model.state_dict()
    default_device = next((t.device for t in model_state.values() if isinstance(t, torch.Tensor)), None)
    state = {}
    # Every saved tensor, also those the model has no entry for: a SparseLinear built with
    # every block kept has no element mask and takes the saved one (load_state_dict reports
    # any other as unexpected, and the model's tensors the checkpoint lacks as missing).
    for key, meta in saved.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        current = model_state.get(key)
        if current is not None and is_sharded(current):
            if tuple(meta.size) != tuple(current.shape):
                raise ValueError(
                    f"memkern.distributed.fsdp.load: {key} is sharded with shape {tuple(current.shape)}, "
                    f"the checkpoint holds {tuple(meta.size)}; a sharded tensor cannot change shape "
                    "(load the checkpoint into the model before fully_shard)"
                )
            state[key] = torch.empty_like(current)
        else:
            device = current.device if current is not None else default_device
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
    # Extra states (SparseLinear's layout): DCP replaces them with the saved ones.
    state.update((key, value) for key, value in model_state.items() if not isinstance(value, torch.Tensor))
    dcp.load(state, checkpoint_id=checkpoint_id, storage_reader=reader)
    return model.load_state_dict(state, strict=strict)
