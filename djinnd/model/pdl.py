"""Programmatic dependent launch (Hopper and later). A decode step at batch 1 is hundreds of small
kernels, each paying a launch gap after the one before it. Launched with PDL, a kernel's programs
start while its predecessor drains and wait (griddepcontrol.wait) before touching memory, so the
gap is hidden; each lets its own successor launch at once. Every PDL kernel waits before it ends,
so waiting on the predecessor also waits on everything before it. Kernels take PDL as a constexpr:
off (the Triton interpreter, GPUs before sm_90, DJINN_PDL=0) they are the plain kernels."""
import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0) and os.environ.get("DJINN_PDL", "1") != "0"


def launch_options(x: torch.Tensor) -> dict:
    """The launch keywords for a kernel working on x: PDL on where the device has it."""
    on = x.is_cuda and _supported(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """First thing in a PDL kernel: wait until the previous kernel's writes are visible, then let
    the next kernel start launching."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
