"""Harvest: layer outputs of many prompts for datasets (probes, SAE training data), outside any session.
Batched prefill forwards over the prompts, cut after the deepest layer asked for, nothing sampled;
KV blocks are borrowed from the pool for the call and given back before the next command. The
outputs go to one segment per call, [layers, total tokens, hidden_size], mode 0600; a connection's
segment is unlinked at its next harvest or when it closes (a mapping outlives it).

A call runs as sub-batches of whole prompts (about a quarter of max_num_batched_tokens each; a longer
prompt goes alone): while the device runs sub-batch k + 1, a worker writes sub-batch k's rows into the
segment (engine/segment_writer.py), so the host's copies and writes hide behind the forward.
"""
import torch

from djinnd.engine.commands import EngineError
from djinnd.engine.segment_writer import SegmentWriter, staging_buffers
from djinnd.memory.activations import ActivationSegment, QuotaExceeded, SegmentTable
from djinnd.session import Session
from libdjinn.protocol import ErrorCode


class Harvester:
    def __init__(self, runner, pool, max_model_len: int, max_tokens: int, quota=None):
        self.runner, self.pool, self.max_model_len, self.max_tokens = runner, pool, max_model_len, max_tokens
        self.quota = quota                  # segments count against their connection's and uid's caps
        self.segments = SegmentTable()      # connection id -> its last harvest
        self.sub_batch_tokens = sub_batch_tokens(max_tokens)
        self.buffers = None                 # staging buffers, reused by every call

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
        shape = (len(layers), total, hidden)
        row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
        if self.quota is not None:
            try:
                self.quota.require(owner, len(layers) * total * row_bytes)
            except QuotaExceeded as e:
                raise EngineError(ErrorCode.LIMIT, f"harvest: {e}") from None
        writer = SegmentWriter(self._staging(row_bytes), self.runner.device,
                               lambda: ActivationSegment(shape, dtype, self.quota, owner))
        try:
            self._sub_batches(writer, sessions, layers, total, row_bytes)
            segment = writer.finish()
        except QuotaExceeded as e:
            raise EngineError(ErrorCode.LIMIT, f"harvest: {e}") from None
        except (MemoryError, OSError) as e:
            raise EngineError(ErrorCode.NO_CAPACITY, f"harvest: {e}") from None
        finally:
            writer.close()                  # after a failure: no worker, no half-written segment
        self.segments.put(owner, segment)
        return segment.descriptor()

    def _sub_batches(self, writer: SegmentWriter, sessions: list[Session], layers: list[int], total: int,
                     row_bytes: int):
        at = 0                              # the sub-batch's first row
        for batch in sub_batches(sessions, self.sub_batch_tokens):
            def after(i: int, h, at=at):
                if i in layers:
                    writer.write(h, (layers.index(i) * total + at) * row_bytes)
                return h
            self.runner.forward([(s, len(s.tokens)) for s in batch], 0, max(layers) + 1, after=after)
            at += sum(len(s.tokens) for s in batch)

    def _staging(self, row_bytes: int) -> list[torch.Tensor]:
        """Staging buffers of one sub-batch's rows of one layer (at most 32 MiB), made at the first call."""
        if self.buffers is None:
            nbytes = min(self.sub_batch_tokens * row_bytes, 32 << 20)
            self.buffers = staging_buffers(3, max(nbytes, row_bytes), self.runner.device)
        return self.buffers

    def release(self, owner: int):
        self.segments.release(owner)

    def close(self):
        self.segments.close()


def sub_batch_tokens(max_tokens: int) -> int:
    """Tokens of one sub-batch of a harvest call: small enough to pipeline (4 a full call), large
    enough to keep the device busy."""
    return max(1, max_tokens // 4)


def sub_batches(sessions: list[Session], max_tokens: int) -> list[list[Session]]:
    """Whole prompts in order, at most max_tokens a batch (a longer prompt goes alone)."""
    batches, size = [[]], 0
    for s in sessions:
        if batches[-1] and size + len(s.tokens) > max_tokens:
            batches.append([])
            size = 0
        batches[-1].append(s)
        size += len(s.tokens)
    return batches
