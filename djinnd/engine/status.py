"""The engine's state as a plain dict, for `djinnctl status` (read on the engine thread)."""
import torch


def engine_status(engine) -> dict:
    model, pool = engine.loaded.model, engine.pool
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "model": {"label": engine.loaded.label, "random_weights": engine.loaded.is_random,
                  "layers": model.args.num_layers, "max_model_len": engine.max_model_len,
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "device": str(engine.device),
        "memory": {
            "weights_bytes": weights,
            "kv_pool_bytes": pool.num_blocks * pool.block_bytes,
            "kv_blocks_total": pool.num_blocks, "kv_blocks_used": pool.num_used,
            "kv_block_tokens": pool.block_size,
            "host_arena_bytes": 0, "host_arena_used_bytes": 0,
            **_device_memory(engine.device),
        },
        "sessions": [_session_row(s) for s in engine.sessions.values()],
        "queue": {"waiting": len(engine.scheduler.waiting), "running": len(engine.scheduler.running)},
        "counters": engine.metrics.snapshot(),
    }


def _session_row(s) -> dict:
    return {"id": s.id, "owner_pid": s.owner_pid, "state": s.state.value, "phase": s.phase.value,
            "tokens": len(s.tokens), "kv_tokens": s.num_cached, "kv_blocks": len(s.block_table),
            "kv_where": "device" if s.block_table else "none"}


def _device_memory(device) -> dict:
    if torch.device(device).type != "cuda":
        return {}
    return {"device_allocated_bytes": torch.cuda.memory_allocated(device),
            "device_reserved_bytes": torch.cuda.memory_reserved(device),
            "device_total_bytes": torch.cuda.get_device_properties(device).total_memory}
