"""Keep compression state identical on every process of a torch.distributed job.

Buffers that change after DDP wrapped the model (masks, codes, codebooks) are not re-broadcast by
DDP, and an argsort or topk tie could in principle resolve differently on two devices: one
broadcast from rank 0 after each change rules that out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite ``tensor`` with rank ``src``'s values, in place; a no-op outside torch.distributed.

    The payload travels as bytes: gloo has no bool or int16 collectives, and bytes of any dtype are
    the same on every rank.
    """
    if not is_distributed():
        return
    payload = tensor.contiguous()
    dist.broadcast(payload.view(-1).view(torch.uint8), src=src)
    if payload.data_ptr() != tensor.data_ptr():
        tensor.copy_(payload)
