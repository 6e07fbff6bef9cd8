"""djinnd: wires model, KV pool, engine thread and socket listener together, and tears them down."""
import asyncio
import logging
import os
import signal
import sys

import torch

from djinnd.engine.engine import Engine
from djinnd.engine.streamer import attach_streamer, load_device
from djinnd.engine.status import memory_probe
from djinnd.memory.block_pool import KVBlockPool
from djinnd.memory.host_arena import HostArena, sweep_stale_segments
from djinnd.model.flat_weights import pack_weights
from djinnd.model.loader import load_model
from djinnd.metrics import TimelineSampler
from djinnd import preflight
from djinnd.preflight import StartupError
from djinnd.server.listener import Listener
from djinnd.server.systemd import notify, watchdog_feeder

EXIT_ENGINE_DIED = 70       # EX_SOFTWARE: systemd's Restart=on-failure brings the daemon back

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
    try:
        loaded = load_model(config.model.model, config.model.seed, dtype, where)
    except Exception as e:
        raise StartupError(f"--model {config.model.model}: cannot load it: {type(e).__name__}: {e}") from None
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


def run(config, path: str) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until the engine thread dies (EXIT_ENGINE_DIED).
    Start-up mistakes raise StartupError before the model loads (cli.py ran preflight.check_all)."""
    preflight.check_model(config.model.model)
    preflight.check_device(config.engine.device, torch.cuda.is_available())
    warning = preflight.memlock_warning(config.memory.pin_host_arena and config.engine.device != "cpu",
                                        config.memory.host_arena_mb)
    if warning and torch.cuda.is_available():
        print(warning, file=sys.stderr, flush=True)
    engine = build_engine(config)
    print(f"djinnd: model {engine.loaded.label} on {engine.device}, KV pool {engine.pool.num_blocks} "
          f"blocks of {engine.pool.block_size} tokens", flush=True)
    try:
        return asyncio.run(_serve(engine, config, path))
    finally:
        sweep_stale_segments(pid=os.getpid())    # whatever a paused session or a crash path left


async def _serve(engine: Engine, config, path: str) -> int:
    listener = Listener(path, config, engine.inbox, engine.loaded)
    await listener.start()
    stop, exit_code = asyncio.Event(), [0]
    loop = asyncio.get_running_loop()

    def engine_died():
        exit_code[0] = EXIT_ENGINE_DIED
        loop.call_soon_threadsafe(stop.set)
    engine.on_death, engine.heartbeat = engine_died, watchdog_feeder()
    engine.start()
    sampler = TimelineSampler(engine.metrics, lambda: memory_probe(engine), config.memory.timeline_period_ms / 1e3)
    sampler.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"djinnd: listening on {listener.path}", flush=True)
    print("djinnd: ready", flush=True)
    notify("READY=1")
    await stop.wait()
    print("djinnd: stopping" if not exit_code[0] else "djinnd: the engine stopped; exiting", flush=True)
    notify("STOPPING=1")
    sampler.stop()
    engine.stop()
    await listener.close()
    engine.join()
    engine.arena.close()
    engine.close_weights()
    return exit_code[0]
