"""Small host lists to device tensors without waiting for the GPU. torch.tensor(values,
device="cuda") and a blocking .to() wait for the stream, and so for the step in flight; a mixed
step that ended a prompt waited so for itself before the tokens of the step before it went out.
A non-blocking copy from pageable memory is staged at once and queued behind the step, as
build_prefill_metadata's copies are."""
import torch


def to_device(values: list, device, dtype=None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
