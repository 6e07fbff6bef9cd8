"""The daemon's configuration: a tree of frozen dataclasses, loaded from YAML, then flags.

Every leaf key is unique across sections, so each has one flag (`kv_cache_mb` -> `--kv-cache-mb`).
Unknown keys and bad values raise ConfigError naming the key.
"""
import dataclasses
from dataclasses import dataclass, field

import yaml

DTYPES = ("auto", "float32", "float16", "bfloat16")
POLICIES = ("semantic", "lru", "recompute", "none")
ATTENTION = ("auto", "triton", "torch")
ADMISSION = ("fifo", "program", "shortest")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
SHARING = ("user", "group", "all", "off")


class ConfigError(ValueError):
    pass


def _require(ok: bool, key: str, why: str):
    if not ok:
        raise ConfigError(f"config key {key!r}: {why}")


@dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m"   # embedded default, a random preset ("random:tiny"), or an HF model dir
    dtype: str = "auto"           # auto: float32 on CPU; on CUDA the checkpoint's (bf16 stays, fp32 -> fp16, as vLLM)
    seed: int = 0                 # seeds random-weight presets
    max_model_len: int = 0        # 0: the model's own context window (131,072 for Llama 3.1); lower to cap it
    export_weights: bool = True   # pack weights in one buffer that local processes can attach (CUDA IPC / shm)

    def __post_init__(self):
        _require(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.max_model_len >= 0, "max_model_len", "must be >= 0")


@dataclass(frozen=True)
class MemoryConfig:
    kv_cache_mb: float = 0.0      # the device KV block pool; 0: gpu_memory_utilization of the GPU (256 MiB on CPU)
    gpu_memory_utilization: float = 0.9  # kv_cache_mb 0 on CUDA: the pool fills this share of the GPU's memory
    block_size: int = 16          # tokens per KV block
    policy: str = "semantic"      # semantic, lru, recompute or none
    host_arena_mb: float = 1024.0  # pinned host shared memory for swapped-out KV
    prefetch_lead_ms: float = 20.0  # semantic: start the prefetch this long before the expected return
    evict_low_water: float = 0.1  # semantic: below this fraction of free KV blocks, IO_WAIT sessions leave in the background
    learned_quantile: float = 0.2  # semantic, no expected_s: prefetch at this quantile of the tool's past durations
    pin_host_arena: bool = True   # page-lock the arena on CUDA (in chunks, in the background)
    timeline_period_ms: float = 100.0  # how often the memory timeline is sampled
    weights_budget_mb: float = 0.0  # device memory for weights (resident + ring); 0: all resident
    prefetch_depth: int = 2       # streamed layers copied ahead of the one computing (0: no prefetch)
    stream_chunk_mb: float = 0.0  # streamed copies in pieces of at most this size (0: one per layer)
    prefix_sharing: str = "user"  # share KV blocks of equal prompt prefixes between sessions of one user, group, all, or off
    reprefill: bool = True        # semantic: prefill dropped KV again ahead of the expected return while the engine is idle

    def __post_init__(self):
        _require(self.kv_cache_mb >= 0, "kv_cache_mb", "must be >= 0 (0: sized from free device memory)")
        _require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        _require(self.block_size > 0, "block_size", "must be > 0")
        _require(self.policy in POLICIES, "policy", f"must be one of {POLICIES}, got {self.policy!r}")
        _require(self.host_arena_mb >= 0, "host_arena_mb", "must be >= 0")
        _require(self.prefetch_lead_ms >= 0, "prefetch_lead_ms", "must be >= 0")
        _require(0 <= self.evict_low_water <= 1, "evict_low_water", "must be in [0, 1]")
        _require(0 <= self.learned_quantile <= 1, "learned_quantile", "must be in [0, 1]")
        _require(self.timeline_period_ms > 0, "timeline_period_ms", "must be > 0")
        _require(self.weights_budget_mb >= 0, "weights_budget_mb", "must be >= 0 (0: all weights resident)")
        _require(self.prefetch_depth >= 0, "prefetch_depth", "must be >= 0")
        _require(self.stream_chunk_mb >= 0, "stream_chunk_mb", "must be >= 0")
        _require(self.prefix_sharing in SHARING, "prefix_sharing", f"must be one of {SHARING}, got {self.prefix_sharing!r}")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"          # a torch device name; auto: cuda if present, else cpu
    max_num_seqs: int = 64        # most sessions in one decode batch
    max_num_batched_tokens: int = 2048  # most prompt tokens fed in one step (longer prompts go in chunks)
    attention: str = "auto"       # decode attention: auto (Triton kernel on CUDA), triton or torch
    cuda_graphs: bool = True      # capture the decode step in CUDA graphs (false: eager, for debugging)
    admission: str = "fifo"       # waiting requests by arrival (fifo), session age (program) or prompt left (shortest)
    admission_max_wait_ms: float = 5000.0  # program, shortest: past this wait a request goes in arrival order
    max_step_ms: float = 0.0      # while sessions decode, prompt chunks shrink so a step takes about this long (0: off)
    mixed_steps: bool = False     # a step that decodes and feeds prompts runs one forward (weights read once)
    kv_cache_dtype: str = "auto"  # the KV pool's: auto (the model's) or fp8_e4m3 (half the bytes, scale 1)
    tensor_parallel: int = 1      # ranks, one process and one GPU each, sharing each layer's heads and MLP columns

    def __post_init__(self):
        ok = self.device in ("auto", "cpu") or self.device.split(":")[0] == "cuda"
        _require(ok, "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(self.max_num_seqs > 0, "max_num_seqs", "must be > 0")
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0")
        _require(self.attention in ATTENTION, "attention", f"must be one of {ATTENTION}, got {self.attention!r}")
        _require(self.admission in ADMISSION, "admission", f"must be one of {ADMISSION}, got {self.admission!r}")
        _require(self.admission_max_wait_ms >= 0, "admission_max_wait_ms", "must be >= 0")
        _require(0 <= self.max_step_ms < float("inf"), "max_step_ms", "must be a finite number >= 0 (0: off)")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                 f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _require(self.tensor_parallel >= 1, "tensor_parallel", "must be >= 1")
        _require(self.kv_cache_dtype == "auto" or self.tensor_parallel == 1, "kv_cache_dtype",
                 "fp8_e4m3 needs tensor_parallel 1 for now")


@dataclass(frozen=True)
class ServerConfig:
    socket: str = ""              # empty: DJINN_SOCKET, $XDG_RUNTIME_DIR/djinn, or /run/djinn
    socket_mode: str = "0600"     # octal permissions of the socket file
    max_frame_bytes: int = 1 << 20
    allowed_group: str = ""       # members of this group may connect too (with socket_mode 0660)
    max_connections: int = 512    # more are answered with an error and closed
    max_connections_per_uid: int = 448   # one user's share, so other users still get in
    max_connections_per_pid: int = 64    # one process's share, so one process cannot take them all
    max_sessions_per_client: int = 256   # open sessions per connection
    max_requests_per_client: int = 512   # requests awaiting their final reply, per connection
    max_unread_reply_mb: float = 64.0    # reply bytes a client leaves unread before it is cut off
    max_paused_per_client: int = 8       # sessions of one connection paused at a breakpoint at once
    max_paused: int = 16                 # the same across all connections (at most half of max_num_seqs)
    pause_timeout_s: float = 300.0       # a pause not resumed by then ends its request (TIMEOUT)
    queue_timeout_s: float = 600.0       # a request waiting this long for KV blocks is refused
    capacity_wait_s: float = 5.0         # waiting for KV room held only by pauses: NO_CAPACITY after this
    max_segment_mb_per_client: float = 1024.0  # shared memory (activations, logits) one connection holds
    max_segment_mb_per_uid: float = 4096.0     # the same for all connections of one user

    def __post_init__(self):
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            mode = -1
        _require(0 <= mode <= 0o777, "socket_mode", f"must be octal like '0600', got {self.socket_mode!r}")
        _require(self.max_frame_bytes >= 1024, "max_frame_bytes", "must be >= 1024")
        for key in ("max_connections", "max_connections_per_uid", "max_connections_per_pid",
                    "max_sessions_per_client", "max_requests_per_client", "max_paused_per_client", "max_paused"):
            _require(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("max_unread_reply_mb", "pause_timeout_s", "queue_timeout_s", "capacity_wait_s",
                    "max_segment_mb_per_client", "max_segment_mb_per_uid"):
            _require(0 < getattr(self, key) < float("inf"), key, "must be a positive number")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def sections() -> dict:
    return {f.name: f.type for f in dataclasses.fields(Config)}


def leaf_fields() -> dict:
    """Every leaf key -> (section name, dataclass field)."""
    return {f.name: (name, f) for name, cls in sections().items() for f in dataclasses.fields(cls)}


def _coerce(key: str, f: dataclasses.Field, value):
    kind = {"str": str, "int": int, "float": float, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    _require(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)), key,
             f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    """YAML file (sections of keys) first, then flat `overrides` (leaf key -> value)."""
    values = {name: {} for name in sections()}
    if path:
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        _require(isinstance(data, dict), "<root>", "the file must hold a mapping of sections")
        for section, keys in data.items():
            _require(section in values, section, f"unknown section; known: {sorted(values)}")
            _require(isinstance(keys, dict), section, "must be a mapping")
            values[section].update({f"{section}.{k}": v for k, v in keys.items()})
    leaves = leaf_fields()
    built = {name: {} for name in values}
    for section, keys in values.items():
        for dotted, value in keys.items():
            key = dotted.split(".", 1)[1]
            _require(key in leaves and leaves[key][0] == section, dotted, "unknown key")
            built[section][key] = _coerce(dotted, leaves[key][1], value)
    for key, value in (overrides or {}).items():
        _require(key in leaves, key, "unknown key")
        section, f = leaves[key]
        built[section][key] = _coerce(key, f, value)
    return Config(**{name: cls(**built[name]) for name, cls in sections().items()})
