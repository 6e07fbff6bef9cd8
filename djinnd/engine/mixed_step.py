"""One forward for a step that both decodes and feeds prompt chunks: the decode rows (persistent
DecodeBatch state on the device) and the chunks' tokens go through the linear layers together, so
the weights are read once; attention splits by kind (the paged decode kernel for the rows, prefill
over the paged prefix for the chunks). On CUDA the step replays a graph of its bucket
(engine/mixed_graphs.py) where one fits, else runs eagerly. Decode-only steps keep the decode
graphs; steps with steering, capture or tensor-parallel ranks keep two forwards.

        rows of h:  [0, R) decode rows, one token each | [R, T) chunk tokens, session by session
        (R = n decode rows eagerly; n's bucket when replayed, its padding rows ignored)
"""
import itertools

import torch

from djinnd.engine.to_device import to_device
from djinnd.model.attention import ForwardContext, build_prefill_metadata, decode_attention_torch, prefill_attention
from djinnd.session import Session


def can_mix(runner, decode: list[Session], chunks: list[tuple[Session, int]]) -> bool:
    interventions = runner.interventions
    return (getattr(runner, "mirror", None) is None and runner.model.streamer is None
            and interventions.mode(decode) == "plain" and interventions.prefill_hook(chunks) is None)


def run_mixed(runner, decode: list[Session], chunks: list[tuple[Session, int]], pipelined: bool):
    """Launch one mixed step. Yields (session, token) pairs: the decode step launched before it (if
    any), each chunk that ends its prompt, and, unless pipelined, this step's decode rows. The step
    before goes out before the host waits for this one's prompt ends, and launching waits for
    nothing: the decoding sessions waited two steps for a token whenever a prompt ended (H200,
    calls L and M: 37-52 ms where other steps took 22-33)."""
    with torch.inference_mode():
        launched, first = _launch(runner, decode, chunks)
    previous, runner.in_flight = runner.in_flight, launched
    if previous:
        yield from runner._collect(previous)
    if first:
        sessions, ids = first
        yield from zip(sessions, ids.tolist())
    if not pipelined:
        runner.in_flight = None
        yield from runner._collect(launched)


def _launch(runner, decode: list[Session], chunks: list[tuple[Session, int]]):
    """The step on the device: its decode rows' sampling launched, and the first tokens of the
    prompts it ends sampled on the device ((sessions, ids), or None)."""
    for s in decode:
        runner.seed(s)
    runner.batch.sync(decode, runner.seeds)
    n, rows = runner.batch.num_rows, list(runner.batch.sessions)
    graphs = runner.mixed_graphs
    if graphs is not None and graphs.fits(chunks):
        h, chunk_row = graphs.run(n, chunks)      # CUDA graphs (engine/mixed_graphs.py)
    else:
        h, chunk_row = _forward(runner, n, rows, chunks), n
    b = runner.batch
    b.positions[:n] += b.is_live[:n]               # as the decode graph does after its forward
    launched = runner.sample_rows(rows, runner.model.logits(h[:n]))
    ends = [i for i, (s, c) in enumerate(chunks) if c == s.num_new_tokens]
    first = None
    if ends:
        offsets = list(itertools.accumulate(c for _, c in chunks))
        last = to_device([chunk_row + offsets[i] - 1 for i in ends], h.device)
        sessions = [chunks[i][0] for i in ends]
        first = sessions, runner.sample_ids(sessions, h[last])
    for s, c in chunks:
        s.num_cached += c
    return launched, first


def _forward(runner, n: int, rows: list[Session], chunks):
    b, pool, model, kernel = runner.batch, runner.pool, runner.model, runner.decoder.kernel
    bs = pool.block_size
    meta = build_prefill_metadata([c for _, c in chunks], [s.num_cached + c for s, c in chunks],
                                  [s.block_table for s, _ in chunks], bs, runner.device)
    ids = torch.tensor([t for s, c in chunks for t in s.tokens[s.num_cached:s.num_cached + c]])
    positions, tables, slots, context_lens = b.rows_kv(n, bs)
    width = None if kernel else pool.blocks_for(max(len(s.tokens) for s in rows) + 1)

    def attend(q, k, v, k_cache, v_cache):
        if kernel:
            rows_out = kernel(q[:n], k_cache, v_cache, tables, context_lens)
        else:
            rows_out = decode_attention_torch(q[:n], k_cache, v_cache, tables, context_lens, width)
        return torch.cat([rows_out, prefill_attention(q[n:], k[n:], v[n:], k_cache, v_cache, meta,
                                                            runner.decoder.prefill_kernel)])

    h = model.embed(torch.cat([b.input_ids[:n], ids.to(runner.device, non_blocking=True)]))
    cos, sin = model.rope(torch.cat([positions, meta.positions]), h.dtype)
    return model.run_layers(h, ForwardContext(cos, sin, torch.cat([slots, meta.slot_mapping]), attend,
                                                 runner.decoder.fused), pool.k, pool.v)
