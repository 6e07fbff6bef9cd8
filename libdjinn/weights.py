"""Attach to djinnd's resident weights: torch tensors in this process that are the daemon's memory,
not a copy (CPU: its POSIX shm segment mapped read-only; CUDA: one IPC handle of its flat buffer),
and an HF transformers LlamaForCausalLM whose parameters are those tensors.

Read-only by contract: the daemon serves every agent from these bytes. On CPU the OS enforces it
(the mapping is PROT_READ: a write kills this process with SIGSEGV, the daemon's weights stay
intact); on CUDA nothing can, so never write to them, and never give them to an optimizer.
"""
import mmap
import os
import warnings
from collections.abc import Mapping

import posix_ipc

LAYOUT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")


class AttachedWeights(Mapping):
    """HF-named tensors (name -> torch.Tensor) viewing the daemon's weights; `config` is the HF config
    dict. Stays valid while this object (or any tensor from it) is alive and the daemon runs."""

    def __init__(self, conn, reply: dict):
        if reply.get("layout_version") != LAYOUT_VERSION:
            raise RuntimeError(f"weights layout version {reply.get('layout_version')} is not supported; "
                               f"this libdjinn reads version {LAYOUT_VERSION}")
        self.conn, self.config, self.nbytes = conn, reply["config"], reply["nbytes"]
        self.kind, self.device = reply["kind"], reply["device"]
        self.segment = reply.get("segment")
        self.buffer = _map_shm(reply) if self.kind == "shm" else _open_cuda_ipc(reply)
        self.tensors = {name: _view(self.buffer, offset, shape, dtype) for name, offset, shape, dtype in
                        _checked(reply["tensors"], self.nbytes)}

    def __getitem__(self, name):
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def detach(self):
        """Tell the daemon this process no longer uses the weights (closing the connection does too).
        The tensors stay mapped until they are garbage-collected."""
        self.conn.request("detach_weights")


def attach_weights(conn, writable: bool = False) -> AttachedWeights:
    if writable:
        raise ValueError("attach_weights(writable=True): the daemon's weights are shared by every agent and "
                         "read-only; clone the tensors you want to change")
    return AttachedWeights(conn, conn.request("attach_weights"))


def hf_model(weights: AttachedWeights):
    """The model's own transformers class (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
    Qwen3ForCausalLM) built on the meta device, its parameters the attached tensors (no copy,
    requires_grad off); buffers such as rotary frequencies are this process's own."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():            # parameters on meta; buffers real, on CPU
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**weights.config))
    model.load_state_dict(dict(weights.tensors), strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"hf_model: the daemon's export has no tensors for {missing[:3]}")
    model.requires_grad_(False)
    model.djinn_weights = weights         # keep the mapping alive as long as the model
    return model.to(torch.device(weights.device)).eval()   # moves buffers only: parameters are there


def _checked(tensors: list, nbytes: int) -> list:
    import torch
    for name, offset, shape, dtype in tensors:
        size = torch.Size(shape).numel() * getattr(torch, dtype).itemsize if dtype in DTYPES else -1
        if size < 0 or offset < 0 or offset + size > nbytes:
            raise RuntimeError(f"weights layout: {name} ({dtype} {shape} at {offset}) is outside the buffer")
    return tensors


def _view(buffer, offset: int, shape: list, dtype: str):
    import torch
    size = torch.Size(shape).numel() * getattr(torch, dtype).itemsize
    return buffer[offset:offset + size].view(getattr(torch, dtype)).view(shape)


def _map_shm(reply: dict):
    """The daemon's sealed memfd (its descriptor came beside the reply), mapped PROT_READ: the seals
    refuse writes and size changes from anyone; an older daemon's named segment, opened O_RDONLY."""
    import torch
    if reply.get("fd") is not None:
        try:
            mapping = mmap.mmap(reply["fd"], reply["nbytes"] or 1, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(reply["fd"])
    else:
        shm = posix_ipc.SharedMemory(reply["segment"], read_only=True)
        try:
            mapping = mmap.mmap(shm.fd, shm.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
    with warnings.catch_warnings():       # torch warns that the buffer is not writable: that is the point
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8, count=reply["nbytes"])


def _open_cuda_ipc(reply: dict):
    """One cudaIpcOpenMemHandle for the whole flat buffer (torch keeps the handle's refcount)."""
    import torch
    device, handle, size, offset, ref_handle, ref_offset, event, event_sync = reply["ipc"]
    # The raw open does not set up CUDA itself: in a process that has not touched the GPU yet it
    # crashed (SIGSEGV in bench_attach's attached processes, H100, 2026-11-23).
    torch.cuda.init()
    torch.cuda.set_device(device)
    storage = torch.UntypedStorage._new_shared_cuda(device, handle, size, offset, ref_handle, ref_offset,
                                                    event, event_sync)
    flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}").set_(storage)
    return flat[:reply["nbytes"]]
