"""MixedGraphs: mixed steps (engine/mixed_step.py) replayed from CUDA graphs, one per (decode-row
bucket, chunk-token bucket). An eager mixed step launches some 600 kernels, and on the H200 its
time stopped falling with its chunk (README, long-context benchmarks); a replay is one launch.

The chunks' side of the forward reads static buffers, written before each replay: token ids,
positions and KV slots (padding tokens write the scratch block), each session's block table and
lengths, and the paged prefill kernel's tiles. Padding tiles point at an empty session, whose
table is the scratch block. The kernel's split count is fixed per bucket; each program's slice
follows its session's length on the device, as in the decode graphs.

        rows of the forward:  [0, R) decode rows (DecodeBatch, padded to R) | [R, R + tokens) chunk tokens
"""
import torch

from djinnd.engine.graphs import buckets_for, token_buckets
from djinnd.model import triton_prefill
from djinnd.model.attention import ForwardContext, build_prefill_metadata
from djinnd.session import Session

MAX_SESSIONS = 4      # prompts one replayed step can feed; a step with more runs eagerly


class MixedGraphs:
    def __init__(self, decoder, max_tokens: int, num_sms: int):
        self.decoder, self.model, self.pool, self.batch = decoder, decoder.model, decoder.pool, decoder.batch
        a, device, bs = self.model.args, self.batch.input_ids.device, self.pool.block_size
        self.kv_heads = self.pool.k.shape[3]
        dtype = self.model.embed(self.batch.input_ids[:1]).dtype
        self.group, self.element_size = a.num_heads // a.num_kv_heads, torch.tensor([], dtype=dtype).element_size()
        self.rows, self.block_n = triton_prefill.tile_shape(self.element_size)
        self.tokens_per_tile = max(1, self.rows // self.group)
        self.token_sizes = token_buckets(max_tokens)
        self.row_sizes = buckets_for(self.batch.max_rows)
        self.max_context = self.batch.block_tables.shape[1] * bs
        self.num_sms = num_sms
        longest, scratch = self.token_sizes[-1], self.pool.scratch_block
        i32 = dict(dtype=torch.int32, device=device)
        self.ids = torch.zeros(longest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(longest, dtype=torch.int64, device=device)
        self.slots = torch.full((longest,), scratch * bs, dtype=torch.int64, device=device)
        self.tables = torch.full((MAX_SESSIONS + 1, self.batch.block_tables.shape[1]), scratch, **i32)
        self.lens = torch.zeros(3, MAX_SESSIONS + 1, **i32)         # q_start, q_len, ctx_len; the last: empty
        self.tile_seq = torch.full((self._tiles_for(longest),), MAX_SESSIONS, **i32)
        self.tile_tok = torch.zeros(self._tiles_for(longest), **i32)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.replays = 0

    def _tiles_for(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_tile) + MAX_SESSIONS      # each prompt adds one partial tile at most

    def fits(self, chunks: list[tuple[Session, int]]) -> bool:
        return bool(self.graphs) and len(chunks) <= MAX_SESSIONS and sum(c for _, c in chunks) <= self.token_sizes[-1]

    @torch.inference_mode()
    def forward(self, rows: int, tokens: int) -> torch.Tensor:
        """The static forward of one bucket: hidden states [rows + tokens, hidden]."""
        b = self.batch
        positions, tables, slots, context_lens = b.rows_kv(rows, self.pool.block_size)
        n_tiles = self._tiles_for(tokens)
        splits = triton_prefill.num_splits_for(n_tiles * self.kv_heads, self.max_context, self.block_n, self.num_sms)
        tiles = triton_prefill.PrefillTiles(self.tile_seq[:n_tiles], self.tile_tok[:n_tiles], self.lens[0],
                                            self.lens[1], self.lens[2], self.tokens_per_tile, self.rows,
                                            self.block_n, splits)
        chunk_slots = self.slots[:tokens]

        def attend(q, k, v, k_cache, v_cache):
            decoded = self.decoder.kernel(q[:rows], k_cache, v_cache, tables, context_lens)
            fed = triton_prefill.paged_prefill_attention(q[rows:], k_cache, v_cache, self.tables, tiles)
            return torch.cat([decoded, fed])

        h = self.model.embed(torch.cat([b.input_ids[:rows], self.ids[:tokens]]))
        cos, sin = self.model.rope(torch.cat([positions, self.positions[:tokens]]), h.dtype)
        return self.model.run_layers(h, ForwardContext(cos, sin, torch.cat([slots, chunk_slots]), attend,
                                                         self.decoder.fused), self.pool.k, self.pool.v)

    def capture(self):
        """Every (rows, tokens) bucket, largest first, in one memory pool, while every buffer is padding."""
        pool = torch.cuda.graph_pool_handle()
        for rows in sorted(self.row_sizes, reverse=True):
            for tokens in reversed(self.token_sizes):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):       # warm-up: compiles and settles the allocator
                    self.forward(rows, tokens)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[(rows, tokens)] = self.forward(rows, tokens)
                self.graphs[(rows, tokens)] = graph
        torch.cuda.synchronize()

    def run(self, rows: int, chunks: list[tuple[Session, int]]) -> tuple[torch.Tensor, int]:
        """Replay the bucket that holds `rows` decode rows and the chunks. Returns the hidden states
        and R, the row where the chunks' tokens start."""
        tokens = sum(c for _, c in chunks)
        padded_rows = next(r for r in self.row_sizes if r >= rows)
        padded_tokens = next(t for t in self.token_sizes if t >= tokens)
        self._load(chunks, padded_tokens)
        self.graphs[(padded_rows, padded_tokens)].replay()
        self.replays += 1
        return self.outputs[(padded_rows, padded_tokens)], padded_rows

    def _load(self, chunks: list[tuple[Session, int]], padded_tokens: int):
        """Write the chunks into the static buffers (in stream order: after the previous replay), as
        the eager path's metadata and the kernel's plan give them; padding after them."""
        lens, contexts = [c for _, c in chunks], [s.num_cached + c for s, c in chunks]
        meta = build_prefill_metadata(lens, contexts, [s.block_table for s, _ in chunks], self.pool.block_size,
                                      self.ids.device)
        plan = triton_prefill.plan(lens, contexts, self.group, self.kv_heads, self.element_size, self.ids.device,
                                   self.num_sms)
        tokens, sessions, tiles = sum(lens), len(chunks), plan.tile_seq.shape[0]
        ids = [t for s, c in chunks for t in s.tokens[s.num_cached:s.num_cached + c]]
        self.ids[:tokens].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:tokens].copy_(meta.positions)
        self.slots[:tokens].copy_(meta.slot_mapping)
        self.slots[tokens:padded_tokens].fill_(self.pool.scratch_block * self.pool.block_size)
        self.tables[:sessions, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        for row, x in enumerate((plan.q_start, plan.q_len, plan.ctx_len)):
            self.lens[row, :sessions].copy_(x)
        self.tile_seq[:tiles].copy_(plan.tile_seq)
        self.tile_seq[tiles:self._tiles_for(padded_tokens)].fill_(MAX_SESSIONS)
        self.tile_tok[:tiles].copy_(plan.tile_tok)
