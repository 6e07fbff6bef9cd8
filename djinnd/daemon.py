"""djinnd: wires model, KV pool, engine thread and socket listener together, and tears them down."""
import asyncio
import logging
import signal

import torch

from djinnd.engine.engine import Engine
from djinnd.engine.streamer import attach_streamer, load_device
from djinnd.engine.status import memory_probe
from djinnd.memory.block_pool import KVBlockPool
from djinnd.memory.host_arena import HostArena, sweep_stale_segments
from djinnd.model.flat_weights import pack_weights
from djinnd.model.loader import load_model
from djinnd.metrics import TimelineSampler
from djinnd.server.listener import Listener
from djinnd.server.systemd import notify
from libdjinn.paths import default_socket_path

log = logging.getLogger("djinnd")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_engine(config) -> Engine:
    device = resolve_device(config.engine.device)
    dtype = resolve_dtype(config.model.dtype, device)
    streaming = config.memory.weights_budget_mb > 0
    where = load_device(config.model.model, dtype, device) if streaming else device
    loaded = load_model(config.model.model, config.model.seed, dtype, where)
    if attach_streamer(loaded.model, config.memory, device) is None and where != device:
        loaded.model.to(device)       # it fits the budget after all
    loaded.flat_weights = pack_weights(loaded.model, config.model.export_weights)
    a = loaded.model.args
    pool = KVBlockPool(a.num_layers, a.num_kv_heads, a.head_dim, config.memory.block_size,
                       config.memory.kv_cache_mb * 2**20, dtype, device)
    sweep_stale_segments()
    arena = HostArena(int(config.memory.host_arena_mb * 2**20 // pool.block_bytes), pool.host_block_shape, dtype,
                      pin=config.memory.pin_host_arena and device.type == "cuda")
    return Engine(loaded, pool, arena, config, device)


def run(config):
    engine = build_engine(config)
    path = config.server.socket or default_socket_path()
    print(f"djinnd: model {engine.loaded.label} on {engine.device}, KV pool {engine.pool.num_blocks} "
          f"blocks of {engine.pool.block_size} tokens", flush=True)
    asyncio.run(_serve(engine, config, path))


async def _serve(engine: Engine, config, path: str):
    listener = Listener(path, config, engine.inbox, engine.loaded)
    await listener.start()
    engine.start()
    sampler = TimelineSampler(engine.metrics, lambda: memory_probe(engine), config.memory.timeline_period_ms / 1e3)
    sampler.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"djinnd: listening on {path}", flush=True)
    print("djinnd: ready", flush=True)
    notify("READY=1")
    await stop.wait()
    print("djinnd: stopping", flush=True)
    notify("STOPPING=1")
    sampler.stop()
    engine.stop()
    await listener.close()
    engine.join()
    engine.arena.close()
    engine.close_weights()
