"""The engine's state as plain dicts, for `djinnctl` and the memory timeline."""
import torch


def engine_status(engine) -> dict:
    model, pool, arena = engine.loaded.model, engine.pool, engine.arena
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "model": {"label": engine.loaded.label, "random_weights": engine.loaded.is_random,
                  "layers": model.args.num_layers, "max_model_len": engine.max_model_len,
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "device": str(engine.device),
        "policy": engine.pager.policy,
        "engine": engine.runner.decoder.status(),
        "memory": {
            "weights_bytes": weights,
            "kv_pool_bytes": pool.num_blocks * pool.block_bytes,
            "kv_blocks_total": pool.num_blocks, "kv_blocks_used": pool.num_used,
            "kv_blocks_shared": pool.num_shared, "kv_blocks_private": pool.num_used - pool.num_shared,
            "kv_blocks_cached": pool.num_cached,
            "kv_block_tokens": pool.block_size,
            "host_arena_bytes": arena.num_blocks * arena.block_bytes,
            "host_arena_used_bytes": arena.num_used * arena.block_bytes,
            "host_arena_segment": arena.name, "host_arena_pin_s": arena.pin_seconds,
            **_device_memory(engine.device),
        },
        "weight_streaming": model.streamer.status() if model.streamer is not None else None,
        "prefix_cache": engine.pager.prefix.status(),
        "sessions": [_session_row(s, pool.refs) for s in engine.sessions.values()],
        "queue": {"waiting": len(engine.scheduler.waiting), "running": len(engine.scheduler.running),
                  "swaps_in_flight": len(engine.pager.swapper.in_flight)},
        "counters": engine.metrics.snapshot(),
        "swaps": engine.metrics.swap_report(recent=5),
        "weights_export": engine.exports.status(),
        "tensor_parallel": engine.tp_ranks.status() if getattr(engine, "tp_ranks", None) else None,
    }


def memory_probe(engine) -> dict:
    """One timeline sample: read from the sampler thread, so only plain counters."""
    pool, arena = engine.pool, engine.arena
    return {"kv_pool_used_bytes": pool.num_used * pool.block_bytes,
            "kv_pool_cached_bytes": pool.num_cached * pool.block_bytes,   # reclaimable prefix cache
            "kv_pool_bytes": pool.num_blocks * pool.block_bytes,
            "host_arena_used_bytes": arena.num_used * arena.block_bytes,
            "sessions": len(engine.sessions),
            **_device_memory(engine.device, total=False)}


def _session_row(s, refs) -> dict:
    where = s.kv.value
    if s.transfers:          # a copy is in flight: show where the KV is headed
        where = "->device" if s.transfers[-1].direction == "in" else "->host"
    elif s.kv.value == "device" and not s.block_table:
        where = "none"
    return {"id": s.id, "owner_pid": s.owner_pid, "state": s.state.value, "phase": s.phase.value,
            "tokens": len(s.tokens), "kv_tokens": s.num_cached, "kv_blocks": len(s.block_table),
            "host_blocks": sum(n for _, n in s.host_runs) + (len(s.block_keys) if s.kv.value == "host" else 0),
            "kv_where": where,
            "shared_blocks": sum(1 for b in s.block_table if refs[b] > 1)}


def _device_memory(device, total=True) -> dict:
    if torch.device(device).type != "cuda":
        return {}
    out = {"device_allocated_bytes": torch.cuda.memory_allocated(device),
           "device_reserved_bytes": torch.cuda.memory_reserved(device)}
    if total:
        out["device_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return out
