"""Harvest: layer outputs of many prompts for datasets (probes, SAE training data), outside any session.
One batched prefill forward over all the prompts, cut after the deepest layer asked for, nothing
sampled; KV blocks are borrowed from the pool for the forward and given back before the next
command. The outputs go to one segment per call, [layers, total tokens, hidden_size], mode 0600;
a connection's segment is unlinked at its next harvest or when it closes (a mapping outlives it).
"""
import torch

from djinnd.engine.commands import EngineError
from djinnd.engine.interventions import host_bytes, write_segment
from djinnd.memory.activations import ActivationSegment, QuotaExceeded, SegmentTable
from djinnd.session import Session
from libdjinn.protocol import ErrorCode


class Harvester:
    def __init__(self, runner, pool, max_model_len: int, max_tokens: int, quota=None):
        self.runner, self.pool, self.max_model_len, self.max_tokens = runner, pool, max_model_len, max_tokens
        self.quota = quota                  # segments count against their connection's and uid's caps
        self.segments = SegmentTable()      # connection id -> its last harvest

    def run(self, owner: int, prompts: list[list[int]], layers: list[int]) -> dict:
        """Descriptor of [len(layers), sum of prompt lengths, hidden_size], prompts in order."""
        self._check(prompts, layers)
        tables = [self.pool.allocate(self.pool.blocks_for(len(p))) for p in prompts]
        try:
            sessions = [Session(0, owner, 0, tokens=list(p), block_table=t) for p, t in zip(prompts, tables)]
            return {"tensor": self._forward(owner, sessions, layers), "layers": layers,
                    "lengths": [len(p) for p in prompts], "max_tokens": self.max_tokens}
        finally:
            for t in tables:
                self.pool.free(t)

    def _check(self, prompts: list[list[int]], layers: list[int]):
        vocab, total = self.runner.model.args.vocab_size, sum(len(p) for p in prompts)
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise EngineError(ErrorCode.BAD_REQUEST, f"harvest: a prompt holds a token outside the vocabulary "
                                                     f"(0..{vocab - 1})")
        if max(len(p) for p in prompts) > self.max_model_len or total > self.max_tokens and len(prompts) > 1:
            raise EngineError(ErrorCode.CONTEXT_OVERFLOW, f"harvest: {len(prompts)} prompts of {total} tokens; the "
                              f"limit is {self.max_model_len} per prompt and {self.max_tokens} per call "
                              "(max_num_batched_tokens; a longer prompt goes alone)")
        need = sum(self.pool.blocks_for(len(p)) for p in prompts)
        if not self.pool.can_allocate(need):
            raise EngineError(ErrorCode.NO_CAPACITY, f"harvest: {total} tokens need {need} KV blocks; "
                              f"{self.pool.num_free} of {self.pool.num_blocks} are free now (retry, or send fewer)")

    @torch.inference_mode()
    def _forward(self, owner: int, sessions: list[Session], layers: list[int]) -> dict:
        self.release(owner)
        total, hidden = sum(len(s.tokens) for s in sessions), self.runner.model.args.hidden_size
        dtype = self.runner.interventions.dtype
        try:
            segment = ActivationSegment((len(layers), total, hidden), dtype, self.quota, owner)
        except QuotaExceeded as e:
            raise EngineError(ErrorCode.LIMIT, f"harvest: {e}") from None
        self.segments.put(owner, segment)
        row_bytes = total * hidden * torch.empty((), dtype=dtype).element_size()

        def after(i: int, h):
            if i in layers:
                write_segment(segment, host_bytes(h), layers.index(i) * row_bytes)
            return h
        self.runner.forward([(s, len(s.tokens)) for s in sessions], 0, max(layers) + 1, after=after)
        return segment.descriptor()

    def release(self, owner: int):
        self.segments.release(owner)

    def close(self):
        self.segments.close()
