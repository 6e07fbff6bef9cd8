"""DecodeGraphs: the decode forward over DecodeBatch rows, eager or replayed from one CUDA graph per
batch-size bucket. Graphs are captured at start-up while every row is padding (positions stay 0,
K/V go to the scratch block), so capture changes nothing a session owns.
"""
import time

import torch

from djinnd.engine.kernels import decode_attention_kernel, fused_kernels, prefill_attention_kernel
from djinnd.model.attention import ForwardContext, build_prefill_metadata, decode_attention_torch, prefill_attention


def buckets_for(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_rows (and max_rows itself)."""
    small = [b for b in (1, 2, 4) if b < max_rows]
    return sorted(set(small + list(range(8, max_rows, 8)) + [max_rows]))


def token_buckets(max_tokens: int) -> list[int]:
    """Prompt tokens of the mixed steps' graphs: 64, 96, 128, 192, ... (powers of two and 1.5 times
    them) below max_tokens, and max_tokens itself. A chunk pays for its bucket, so the step budget
    feeds whole buckets (StepBudget.sizes); buckets 1.5x apart lose at most a third of a step."""
    sizes, n = [], 64
    while n < max_tokens:
        sizes += [x for x in (n, n * 3 // 2) if x < max_tokens]
        n *= 2
    return sizes + [max_tokens]


class DecodeGraphs:
    def __init__(self, model, pool, batch, device, backend: str = "auto", use_graphs: bool = True):
        self.model, self.pool, self.batch = model, pool, batch
        self.kernel = decode_attention_kernel(device, model.args.head_dim, backend, model.args.num_kv_heads,
                                              batch.block_tables.shape[1] * pool.block_size)
        self.prefill_kernel = prefill_attention_kernel(device, model.args.head_dim, backend)
        self.fused = fused_kernels(device, backend)
        self.use_graphs = use_graphs and torch.device(device).type == "cuda"
        self.logits = torch.zeros(batch.max_rows, model.args.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.variants = {"plain": self.graphs}     # mode -> {bucket: graph} (engine/interventions.py)
        if batch.interventions is not None:
            self.variants.update(steer={}, capture={})
        self.capture_s, self.graph_bytes = 0.0, 0
        self.mirror = getattr(model, "mirror", None)    # tensor parallelism: the other ranks (engine/tp_mirror.py)

    @property
    def attention(self) -> str:
        return "triton" if self.kernel else "torch"

    @torch.inference_mode()
    def forward(self, n: int, num_blocks: int | None = None, mode: str = "plain"):
        """Rows [0, n): logits into self.logits[:n], then every live row's position advances by one.
        num_blocks bounds the torch path's gather (host-known); the kernel needs no bound.
        mode: plain, steer (add the rows' vectors) or capture (steer and stage every layer's output)."""
        b, block_size = self.batch, self.pool.block_size
        positions, tables, slots, context_lens = b.rows_kv(n, block_size)
        width = num_blocks or tables.shape[1]

        def attend(q, k, v, k_cache, v_cache):
            if self.kernel:
                return self.kernel(q, k_cache, v_cache, tables, context_lens)
            return decode_attention_torch(q, k_cache, v_cache, tables, context_lens, width)

        h = self.model.embed(b.input_ids[:n])
        cos, sin = self.model.rope(positions, h.dtype)
        h = self.model.run_layers(h, ForwardContext(cos, sin, slots, attend, self.fused), self.pool.k, self.pool.v,
                                  after=b.intervention_hook(n, mode))
        self.logits[:n] = self.model.logits(h)
        b.positions[:n] += b.is_live[:n]

    def run(self, n: int, num_blocks: int | None = None, mode: str = "plain") -> torch.Tensor:
        if self.mirror is not None:
            self.mirror.decode(self.batch, n, num_blocks, mode)
        graphs = self.variants.get(mode, {})
        bucket = next((size for size in sorted(graphs) if size >= n), None)
        if bucket is None:
            self.forward(n, num_blocks, mode)
        else:
            graphs[bucket].replay()
        return self.logits[:n]

    def capture(self):
        """One graph per bucket, largest first, sharing one memory pool."""
        self._compile_prefill_kernel()
        if not self.use_graphs or self.model.streamer is not None:
            return
        assert self.batch.num_rows == 0, "capture only while every row is padding"
        if self.mirror is not None:
            self.mirror.capture()
        started, before = time.perf_counter(), torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        for mode, graphs in self.variants.items():   # unsteered batches replay graphs without the adds
            for size in sorted(buckets_for(self.batch.max_rows), reverse=True):
                graphs[size] = self._capture_one(size, mode, pool)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - started
        self.graph_bytes = torch.cuda.memory_reserved() - before

    @torch.inference_mode()
    def _compile_prefill_kernel(self):
        """Compile the paged prefill kernel's variants (one key slice, several) at start-up, not in
        the first step a long prompt meets: a compile holds that step for about a second. One token
        after a prefix of scratch blocks, K/V written to the scratch block."""
        if self.prefill_kernel is None:
            return
        a, bs, scratch, device = self.model.args, self.pool.block_size, self.pool.scratch_block, self.logits.device
        dtype = self.model.embed(self.batch.input_ids[:1]).dtype
        kv_heads = self.pool.k.shape[3]        # this rank's, under tensor parallelism
        q = torch.zeros(1, kv_heads * a.num_heads // a.num_kv_heads, a.head_dim, dtype=dtype, device=device)
        kv = torch.zeros(1, kv_heads, a.head_dim, dtype=dtype, device=device)
        for context in (2, 64 * bs):
            meta = build_prefill_metadata([1], [context], [[scratch] * -(-context // bs)], bs, device)
            prefill_attention(q, kv, kv, self.pool.k[0], self.pool.v[0], meta, self.prefill_kernel)

    def _capture_one(self, size: int, mode: str, pool) -> "torch.cuda.CUDAGraph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):       # warm-up compiles kernels and settles the allocator
            self.forward(size, mode=mode)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.forward(size, mode=mode)
        return graph

    def status(self) -> dict:
        return {"attention": self.attention, "cuda_graphs": bool(self.graphs), "buckets": sorted(self.graphs),
                "capture_s": round(self.capture_s, 3), "graph_pool_bytes": self.graph_bytes}
