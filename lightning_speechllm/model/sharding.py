"""Fully sharded training (torch FSDP2, ``fully_shard``) of a SpeechLLM, through Lightning's ModelParallelStrategy.

Units: each decoder layer, the decoder root (embeddings, final norm, LM head), the projector, and the encoder when it
trains (a frozen encoder is replicated: it needs no gradient reduction). FSDP2 shards in place: the layer objects
stay the same, so the decoder-layer masks (which swap lists of those objects) compose with it, provided the root's
lazy initialisation sees every layer (done here, with all layers active). Runs on CPU process groups (gloo) as on
GPUs (nccl).

Checkpoints stay single files holding the trainable weights only, gathered to full tensors on every rank and written
by rank 0, so every reader (``measure``, ``sweep``, ``export``, ``heal --teacher_checkpoint``) reads them.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_speechllm.model.layer_mask import get_layer_mask_state

__all__ = ["FSDP2Strategy", "full_tensor", "is_sharded", "load_into", "shard_speechllm"]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (sharded) DTensor, a collective: every rank must ask, in the same order."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def load_into(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a (possibly sharded) parameter; every rank holds ``value`` (no communication)."""
    with torch.no_grad():
        if isinstance(parameter, DTensor):
            local = distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements,
                                      src_data_rank=None).to_local()
            parameter.to_local().copy_(local)
        else:
            parameter.copy_(value)


def shard_speechllm(speechllm: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> None:
    """Apply FSDP2 to a SpeechLLM in place (see the module docstring for the units)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(speechllm):
        return
    mask = speechllm.layer_mask
    with mask.active(range(mask.num_layers)):  # every layer registered: each one becomes a unit of the root
        for layer in get_layer_mask_state(speechllm.llm).layer_list:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(speechllm.llm, mesh=mesh, reshard_after_forward=reshard_after_forward)
        # The root's lazy init records its sub-units; run it now, while no layer is masked out.
        speechllm.llm._get_fsdp_state()._lazy_init()
    if speechllm.projector is not None:
        fully_shard(speechllm.projector, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if speechllm.encoder is not None and speechllm.config.train_encoder:
        fully_shard(speechllm.encoder, mesh=mesh, reshard_after_forward=reshard_after_forward)


@contextmanager
def _all_layers(lightning_module: Any) -> Iterator[None]:
    speechllm = getattr(lightning_module, "speechllm", None)
    if speechllm is None:
        yield
        return
    mask = speechllm.layer_mask
    with mask.active(range(mask.num_layers)):
        yield


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every rank (no tensor parallelism), for a ``SpeechLLMModule`` / ``HealingModule``.

    The module's ``configure_model`` shards the SpeechLLM (:func:`shard_speechllm`). Checkpoints are one file with the
    trainable weights only (the module's ``on_save_checkpoint``) and the optimizer state gathered to full tensors;
    resuming loads them back into the shards.

    Args:
        reshard_after_forward: free the gathered weights after each unit's forward (ZeRO-3); False keeps them until
            backward (ZeRO-2-like: faster, more memory).
        process_group_backend: None = nccl on GPUs, gloo on the CPU.
    """

    def __init__(self, reshard_after_forward: bool = True, process_group_backend: str | None = None, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, **kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # Lightning's "auto" would be num_nodes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Lightning would gather every weight, the frozen decoder included; on_save_checkpoint writes the trainables.
        return {}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        with _all_layers(self.lightning_module):  # the optimizer holds the trainables of every layer
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Read the single-file checkpoint on every rank (data only), load the trainable weights into the shards and,
        when fitting, the optimizer states."""
        from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from lightning_speechllm.model.checkpoint import load_checkpoint_file

        path = Path(self.broadcast(str(checkpoint_path)))
        checkpoint = load_checkpoint_file(path)
        module = self.lightning_module
        module.load_state_dict(checkpoint["state_dict"])
        optimizer_states = checkpoint.pop("optimizer_states", [])
        if module.trainer.state.fn == "fit":
            with _all_layers(module):
                for optimizer, state in zip(self.optimizers, optimizer_states):
                    state = _rekey_optimizer_state_if_needed(state, self.model)
                    set_optimizer_state_dict(self.model, optimizer, state,
                                             options=StateDictOptions(full_state_dict=True, strict=False))
        return checkpoint
