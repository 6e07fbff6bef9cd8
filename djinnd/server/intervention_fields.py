"""Checks of a request's steering, capture, stop_at_layer and harvest fields, against the model's shape,
so a bad vector is refused with its reason before it reaches a batch. No torch: vectors are float32
arrays (sent as msgpack bytes, or as a list of floats), never pickle."""
import math
from array import array

from djinnd.engine import commands as cmd
from libdjinn.protocol import ErrorCode, ProtocolError

POSITIONS = ("all", "prompt", "generated")
STEER_KEYS = {"layer", "vector", "scale", "positions"}
MAX_HARVEST_PROMPTS = 65536


def bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def interventions(f: dict, num_layers: int, hidden_size: int) -> cmd.Interventions | None:
    steer, capture, stop_at = f.get("steer") or [], f.get("capture") or [], f.get("stop_at_layer")
    if not (steer or capture or stop_at is not None):
        return None
    out = cmd.Interventions([steer_vector(item, num_layers, hidden_size) for item in _items(steer, num_layers)],
                            layer_list("capture", capture, num_layers), stop_at)
    if len({v.layer for v in out.steer}) != len(out.steer):
        raise bad("generate: steer names a layer twice; give one vector per layer")
    if stop_at is not None:
        _check_stop_at(stop_at, out.capture, f.get("breakpoints") or [], num_layers)
    return out


def _items(steer, num_layers: int) -> list:
    if not isinstance(steer, list) or len(steer) > num_layers:
        raise bad(f"generate: steer must be a list of at most {num_layers} vectors (one per layer)")
    return steer


def steer_vector(item, num_layers: int, hidden_size: int) -> cmd.SteerVector:
    if not isinstance(item, dict) or set(item) - STEER_KEYS or "vector" not in item:
        raise bad("generate: each steer item is {'layer': int, 'vector': float32 bytes or list of floats, "
                  "'scale': float (1), 'positions': 'all' | 'prompt' | 'generated'}")
    layer = _layer("steer", item.get("layer"), num_layers)
    values = _vector(item["vector"], layer, hidden_size)
    scale = item.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise bad(f"generate: steer scale of layer {layer} must be a finite number, got {scale!r}")
    positions = item.get("positions", "all")
    if positions not in POSITIONS:
        raise bad(f"generate: steer positions of layer {layer} must be one of {POSITIONS}, got {positions!r}")
    return cmd.SteerVector(layer, values, float(scale), positions)


def _vector(raw, layer: int, hidden_size: int) -> array:
    try:
        values = array("f", raw) if isinstance(raw, bytes) and len(raw) % 4 == 0 else \
            array("f", raw) if isinstance(raw, list) and all(_number(x) for x in raw) else None
    except OverflowError:
        values = None
    if values is None:
        raise bad(f"generate: steer vector of layer {layer} must be float32 bytes (little-endian) or a list "
                  "of numbers in float32 range")
    if len(values) != hidden_size:
        raise bad(f"generate: steer vector of layer {layer} has {len(values)} values; the model's hidden "
                  f"size is {hidden_size}")
    if not all(map(math.isfinite, values)):
        raise bad(f"generate: steer vector of layer {layer} holds NaN or infinity")
    return values


def layer_list(name: str, layers, num_layers: int) -> list[int]:
    if not isinstance(layers, list) or len(layers) > num_layers:
        raise bad(f"{name}: layers must be a list of at most {num_layers} layer numbers")
    out = [_layer(name, x, num_layers) for x in layers]
    if len(set(out)) != len(out):
        raise bad(f"{name}: a layer is named twice in {out}")
    return out


def _check_stop_at(stop_at: int, capture: list[int], breakpoints: list, num_layers: int):
    _layer("stop_at_layer", stop_at, num_layers)
    named = set(capture) | {b.get("layer") for b in breakpoints if isinstance(b, dict) and _int(b.get("layer"))}
    past = sorted(x for x in named if x > stop_at)
    if past:
        raise bad(f"generate: layers {past} come after stop_at_layer {stop_at}: the forward never reaches them")


def harvest(f: dict, num_layers: int, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    prompts, layers = f["prompts"], layer_list("harvest", f["layers"], num_layers)
    if not layers:
        raise bad("harvest: give at least one layer")
    ok = 0 < len(prompts) <= MAX_HARVEST_PROMPTS and all(
        isinstance(p, list) and p and all(_int(t) and 0 <= t < vocab_size for t in p) for p in prompts)
    if not ok:
        raise bad(f"harvest: prompts must be 1 to {MAX_HARVEST_PROMPTS} non-empty lists of token ids "
                  f"in [0, {vocab_size})")
    return prompts, layers


def _layer(name: str, x, num_layers: int) -> int:
    if not _int(x) or not 0 <= x < num_layers:
        raise bad(f"{name}: layer {x!r} out of range: the model has layers 0..{num_layers - 1}")
    return x


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
