"""Small host lists to device tensors without waiting for the GPU. torch.tensor(values,
device="cuda") and a blocking .to() wait for the stream, and so for the step in flight; a mixed
step that ended a prompt waited so for itself before the tokens of the step before it went out.
From pinned memory (PyTorch's caching host allocator keeps the block until the copy is done) the
copy is queued and the host goes on."""
import torch


def to_device(values: list, device, dtype=None) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
