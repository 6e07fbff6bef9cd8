"""djinnd: wires model, KV pool, engine thread and socket listener together, and tears them down."""
import asyncio
import gc
import logging
import os
import signal
import sys

import torch

from djinnd.engine.engine import Engine
from djinnd.engine.streamer import attach_streamer, load_device
from djinnd.engine.status import memory_probe
from djinnd.engine.tp_ranks import Ranks, startup_problem
from djinnd.memory.block_pool import KVBlockPool
from djinnd.memory.host_arena import HostArena, sweep_stale_segments
from djinnd.model.flat_weights import Unexported, pack_weights
from djinnd.model.loader import load_model, model_args
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


def resolve_dtype(name: str, device: torch.device, checkpoint: str | None = None) -> torch.dtype:
    """auto: float32 on CPU (half-precision matmuls are slow there); on CUDA the checkpoint's dtype,
    float32 checkpoints in float16 (vLLM's rule)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if checkpoint == "bfloat16" else torch.float16


def kv_budget_bytes(config, args, dtype, device) -> float:
    """kv_cache_mb, or (0) on CUDA what gpu_memory_utilization leaves after the weights, other
    processes and a reserve for one step's activations; 256 MiB on CPU, where RAM is no budget."""
    if config.memory.kv_cache_mb:
        return config.memory.kv_cache_mb * 2**20
    if device.type != "cuda":
        return 256 * 2**20
    free, total = torch.cuda.mem_get_info(device)
    size = torch.empty((), dtype=dtype).element_size()
    tokens = config.engine.max_num_batched_tokens
    activations = tokens * (4 * args.hidden_size + 3 * args.intermediate_size + args.q_size) * size * 2
    prefix_gather = 2 * args.window * args.kv_size * size          # one layer's K/V of a long prefix
    logits = config.engine.max_num_seqs * args.vocab_size * 4 * 3
    reserve = activations + prefix_gather + logits + 1 * 2**30     # CUDA graphs, cuBLAS workspaces
    budget = config.memory.gpu_memory_utilization * total - (total - free) - reserve
    if budget <= 0:
        raise StartupError(f"no GPU memory left for the KV cache: {free / 2**30:.1f} of {total / 2**30:.1f} GiB "
                           f"free after the weights; raise --gpu-memory-utilization or pass --kv-cache-mb")
    return budget


def build_engine(config) -> Engine:
    device = resolve_device(config.engine.device)
    try:
        args = model_args(config.model.model)
    except Exception as e:
        raise StartupError(f"--model {config.model.model}: {e}") from None
    dtype = resolve_dtype(config.model.dtype, device, args.torch_dtype)
    if config.model.max_model_len > args.window:
        raise StartupError(f"--max-model-len {config.model.max_model_len} exceeds the model's context window "
                           f"of {args.window} tokens")
    streaming = config.memory.weights_budget_mb > 0
    world = config.engine.tensor_parallel
    ranks = start_ranks(config, args, device, dtype, streaming) if world > 1 else None
    try:
        engine = _build_engine(config, args, device, dtype, streaming, ranks)
    except BaseException:
        if ranks is not None:
            ranks.close()
        raise
    engine.tp_ranks = ranks
    return engine


def _build_engine(config, args, device, dtype, streaming: bool, ranks) -> Engine:
    world = 1 if ranks is None else ranks.world
    where = load_device(config.model.model, dtype, device) if streaming else device
    try:
        loaded = load_model(config.model.model, config.model.seed, dtype, where, None if ranks is None else ranks.tp)
    except Exception as e:
        raise StartupError(f"--model {config.model.model}: cannot load it: {type(e).__name__}: {e}") from None
    if attach_streamer(loaded.model, config.memory, device) is None and where != device:
        loaded.model.to(device)       # it fits the budget after all
    loaded.flat_weights = pack_weights(loaded.model, config.model.export_weights) if ranks is None else Unexported(
        f"tensor_parallel {world}: the weights are split across {world} ranks; attach (and hf_model()) serve one")
    kv_dtype = torch.float8_e4m3fn if config.engine.kv_cache_dtype == "fp8_e4m3" else dtype
    budget = kv_budget_bytes(config, args, dtype, device)      # activations and gathers: the model dtype
    if ranks is not None:            # kv_cache_mb (and CPU's default) is the whole pool; each rank holds its heads
        budget = budget / world if config.memory.kv_cache_mb or device.type != "cuda" else budget
        budget = _or_startup_error(lambda: ranks.kv_budget(
            budget, torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None))
    pool = KVBlockPool(args.num_layers, args.num_kv_heads // world, args.head_dim, config.memory.block_size,
                       budget, kv_dtype, device)
    sweep_stale_segments()
    arena = HostArena(int(config.memory.host_arena_mb * 2**20 // (pool.block_bytes * world)), pool.host_block_shape,
                      torch.uint8 if kv_dtype.itemsize == 1 else kv_dtype,     # fp8 swaps as bytes
                      pin=config.memory.pin_host_arena and device.type == "cuda")
    if ranks is not None:
        _or_startup_error(lambda: ranks.build(pool, arena, sum(p.numel() * p.element_size()
                                                               for p in loaded.model.parameters())))
        loaded.model.mirror = pool.mirror = ranks.mirror     # the runner, graphs and swapper announce their work
    return Engine(loaded, pool, arena, config, device)


def start_ranks(config, args, device, dtype, streaming: bool) -> Ranks:
    """Tensor parallelism: checks, then the worker ranks spawned and joined with this process (rank 0)."""
    world = config.engine.tensor_parallel
    why = startup_problem(world, args, device, streaming)
    if why:
        raise StartupError(why)
    return _or_startup_error(lambda: Ranks(config, device, dtype, config.model.max_model_len or args.window))


def _or_startup_error(fn):
    try:
        return fn()
    except RuntimeError as e:
        raise StartupError(str(e)) from None


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
    pool = engine.pool
    print(f"djinnd: model {engine.loaded.label} on {engine.device} ({str(pool.k.dtype).removeprefix('torch.')}), "
          f"context {engine.max_model_len} tokens; KV pool {pool.num_blocks} blocks of {pool.block_size} tokens = "
          f"{pool.num_blocks * pool.block_size:,} tokens ({pool.num_blocks * pool.block_bytes / 2**30:.2f} GiB)",
          flush=True)
    if engine.tp_ranks is not None:
        print(f"djinnd: tensor parallel over {engine.tp_ranks.world} ranks ({engine.tp_ranks.backend}); each holds "
              f"{engine.pool.k.shape[3]} KV heads of every layer", flush=True)
    try:
        return asyncio.run(_serve(engine, config, path))
    finally:
        if engine.tp_ranks is not None:
            engine.tp_ranks.close()
        sweep_stale_segments(pid=os.getpid())    # whatever a paused session or a crash path left


def freeze_startup_heap():
    """Move every object alive now (the model, graphs, imported modules: some 300k) out of the
    collector's reach. A full collection scans them all with the engine thread stopped (the GIL):
    about 190 ms on the 2-core CI machine, a TPOT spike whenever one runs while serving."""
    gc.collect()
    gc.freeze()


async def _serve(engine: Engine, config, path: str) -> int:
    listener = Listener(path, config, engine.inbox, engine.loaded)
    await listener.start()
    stop, exit_code = asyncio.Event(), [0]
    loop = asyncio.get_running_loop()

    def engine_died():
        exit_code[0] = EXIT_ENGINE_DIED
        loop.call_soon_threadsafe(stop.set)
    engine.on_death, engine.heartbeat = engine_died, watchdog_feeder()
    if engine.tp_ranks is not None:
        engine.tp_ranks.watch(engine_died)        # a rank that dies stops the daemon, as the engine's death does
    freeze_startup_heap()
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
