"""LayerStreamer: runs a model whose weights exceed the weight budget. The embeddings, lm_head, every
norm and the first K decoder layers stay resident; the matrices of the other layers live in host
memory (HostWeights) and pass through a device WeightRing just ahead of compute.

Why the first K: the streamed layers then end the forward, so the copy stream fills the ring with
the next forward's first streamed layers while this one finishes, the host samples, and the
resident layers run; on an H100 a layer's compute is far shorter than its copy, so where the
resident layers sit does not change the steady state, and one number K is the whole plan.

The model calls before_layer(i) / after_layer(i) around decoder layer i. Between uses a streamed
layer's parameters point at its host copy, so the model's parameters are always the real weights.
"""
import collections

import torch
from torch import nn

from djinnd.config import ConfigError
from djinnd.memory.host_weights import HostWeights, layer_layout
from djinnd.memory.weight_ring import WeightRing
from djinnd.model.llama import LlamaForCausalLM
from djinnd.model.presets import PRESETS

STREAMED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
MiB = 2**20


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def streamed_shapes(model) -> dict:
    layer = model.model.layers[0]
    return {name: tuple(layer.get_submodule(name).weight.shape) for name in STREAMED}


def plan_resident_layers(model, budget_bytes: int, depth: int) -> int | None:
    """How many leading decoder layers stay resident; None when the whole model fits the budget.
    The budget covers every weight on the device: resident tensors and the ring."""
    if param_bytes(model) <= budget_bytes:
        return None
    dtype, a = next(model.parameters()).dtype, model.args
    slot_bytes = layer_layout(streamed_shapes(model), dtype)[1]
    fixed = param_bytes(model) - a.num_layers * _matrix_bytes(model)      # embeddings, lm_head, norms
    ring = (depth + 1) * slot_bytes
    if fixed + ring > budget_bytes:
        raise ConfigError(f"config key 'weights_budget_mb': {budget_bytes / MiB:,.1f} MiB cannot hold the "
                          f"embeddings, norms and lm_head ({fixed / MiB:,.1f} MiB) plus a ring of {depth + 1} "
                          f"layers ({ring / MiB:,.1f} MiB); give at least {(fixed + ring) / MiB:,.1f}, or a "
                          f"smaller prefetch_depth")
    return min((budget_bytes - fixed - ring) // _matrix_bytes(model), a.num_layers - 1)


def _matrix_bytes(model) -> int:
    layer = model.model.layers[0]
    return sum(layer.get_submodule(n).weight.numel() * layer.get_submodule(n).weight.element_size() for n in STREAMED)


def load_device(model_name: str, dtype, device) -> torch.device:
    """Where to build a model before streaming: the device when a random preset fits there (fast
    generation), else host memory."""
    device = torch.device(device)
    if device.type != "cuda" or not model_name.startswith("random:"):
        return torch.device("cpu")
    with torch.device("meta"):
        nbytes = sum(p.numel() for p in LlamaForCausalLM(PRESETS[model_name.split(":", 1)[1]]).parameters())
    nbytes *= torch.empty((), dtype=dtype).element_size()
    return device if nbytes < 0.9 * torch.cuda.mem_get_info(device)[0] else torch.device("cpu")


class LayerStreamer:
    def __init__(self, model, num_resident: int, depth: int, chunk_bytes: int, device, pin: bool):
        self.model, self.first = model, num_resident
        self.num_streamed = model.args.num_layers - num_resident
        dtype, shapes = next(model.parameters()).dtype, streamed_shapes(model)
        self.modules = [[layer.get_submodule(n) for n in STREAMED] for layer in model.model.layers]
        self.host = HostWeights(self.num_streamed, shapes, dtype, pin)
        self._move(device)
        self.host_params = [self._params(t) for t in self.host.tensors]
        for i in range(self.first, model.args.num_layers):
            self._bind(i, self.host_params[i - self.first])
        self.host.start_pinning()
        self.resident_bytes = param_bytes(model) - self.host.nbytes
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()          # the streamed layers' device copies are gone
        self.ring = None
        self.set_ring(depth, chunk_bytes, device)

    def set_ring(self, depth: int, chunk_bytes: int, device):
        """A ring of depth + 1 slots (at most one per streamed layer); call between forwards only."""
        if self.ring is not None and self.ring.copy_stream is not None:
            self.ring.copy_stream.synchronize()      # prefetches still in flight write into the old ring
        self.ring = self.slot_params = None           # the old ring's memory goes first
        slots = min(depth + 1, self.num_streamed)
        self.ring = WeightRing(self.host.shapes, self.host.dtype, device, slots * self.host.layer_bytes, chunk_bytes)
        self.slot_params = [self._params(v) for v in self.ring.views]
        self.loaded = collections.deque()     # (streamed position, slot): a cyclic run, in load order
        self.next_slot = 0

    # ---- set-up ------------------------------------------------------------------------------
    @torch.no_grad()      # loaded parameters require grad: a recorded copy's graph would keep every original alive
    def _move(self, device):
        """Streamed matrices into host memory; everything else onto the device (ties kept)."""
        moved = {}
        for i, layer in enumerate(self.model.model.layers):
            if i >= self.first:
                for name, module in zip(STREAMED, self.modules[i]):
                    self.host.tensors[i - self.first][name].copy_(module.weight)
                    module._parameters["weight"] = None      # drop the device copy as we go
        for module in self.model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    if id(p) not in moved:
                        moved[id(p)] = nn.Parameter(p.data.to(device), requires_grad=False)
                    module._parameters[name] = moved[id(p)]

    @staticmethod
    def _params(tensors: dict) -> list:
        return [nn.Parameter(tensors[n], requires_grad=False) for n in STREAMED]

    def _bind(self, i: int, params: list):
        for module, p in zip(self.modules[i], params):
            module._parameters["weight"] = p

    # ---- the model's hooks -------------------------------------------------------------------
    def before_layer(self, i: int):
        self._fill(max(i - self.first, 0))
        if i >= self.first:
            slot = self.loaded[0][1]
            self.ring.wait(slot)
            self._bind(i, self.slot_params[slot])

    def after_layer(self, i: int):
        if i >= self.first:
            self.ring.release(self.loaded[0][1])
            self._bind(i, self.host_params[i - self.first])

    def _fill(self, head: int):
        """Make the ring hold streamed positions head, head+1, ... (cyclic, into the next forward)."""
        if head in (pos for pos, _ in self.loaded):
            while self.loaded[0][0] != head:
                self.loaded.popleft()
        else:
            self.loaded.clear()       # a forward began elsewhere (a breakpoint's segment): start over
        pos = (self.loaded[-1][0] + 1) % self.num_streamed if self.loaded else head
        while len(self.loaded) < self.ring.num_slots:
            self.ring.load(self.next_slot, self.host.flat[pos])
            self.loaded.append((pos, self.next_slot))
            self.next_slot, pos = (self.next_slot + 1) % self.ring.num_slots, (pos + 1) % self.num_streamed

    def status(self) -> dict:
        return {"resident_layers": self.first, "streamed_layers": self.num_streamed,
                "resident_bytes": self.resident_bytes, "streamed_bytes": self.host.nbytes,
                "prefetch_depth": self.ring.num_slots - 1, "host_pinned_s": self.host.pin_seconds,
                **self.ring.stats()}


def attach_streamer(model, memory, device) -> LayerStreamer | None:
    """Stream `model` if its weights exceed memory.weights_budget_mb (0: all resident)."""
    if not memory.weights_budget_mb:
        return None
    budget = int(memory.weights_budget_mb * MiB)
    k = plan_resident_layers(model, budget, memory.prefetch_depth)
    if k is None:
        return None
    model.streamer = LayerStreamer(model, k, memory.prefetch_depth, int(memory.stream_chunk_mb * MiB), device,
                                   pin=torch.device(device).type == "cuda")
    return model.streamer
