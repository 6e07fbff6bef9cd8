"""djinnctl: look at a running djinnd. `djinnctl status [--json]`. Exit 0 ok, 3 daemon not running."""
import argparse
import json
import sys

from libdjinn.client import Connection, DjinnError

MiB = 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="djinnctl", description="Inspect a running djinnd.")
    p.add_argument("--socket", help="daemon socket (default: DJINN_SOCKET or the runtime dir)")
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="model, device, memory, sessions and counters")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    try:
        with Connection(args.socket) as conn:
            report = conn.status()
    except (FileNotFoundError, ConnectionRefusedError) as e:
        print(f"djinnctl: djinnd is not running ({e})", file=sys.stderr)
        return 3
    except DjinnError as e:
        print(f"djinnctl: {e}", file=sys.stderr)
        return 1
    report.pop("type"), report.pop("id")
    print(json.dumps(report, indent=1) if args.json else format_status(report))
    return 0


def format_status(r: dict) -> str:
    m, mem, q = r["model"], r["memory"], r["queue"]
    block_bytes = mem["kv_pool_bytes"] / max(mem["kv_blocks_total"], 1)
    lines = [
        f"model    {m['label']}  ({m['layers']} layers, {m['dtype']}, context {m['max_model_len']})",
        f"device   {r['device']}",
        f"weights  {mem['weights_bytes'] / MiB:,.1f} MiB",
        f"kv pool  {mem['kv_blocks_used']}/{mem['kv_blocks_total']} blocks of {mem['kv_block_tokens']} tokens"
        f"  ({mem['kv_blocks_used'] * block_bytes / MiB:,.1f}/{mem['kv_pool_bytes'] / MiB:,.1f} MiB)",
        f"host     {mem['host_arena_used_bytes'] / MiB:,.1f}/{mem['host_arena_bytes'] / MiB:,.1f} MiB arena",
    ]
    if "device_allocated_bytes" in mem:
        lines.append(f"vram     {mem['device_allocated_bytes'] / MiB:,.0f} MiB allocated, "
                     f"{mem['device_reserved_bytes'] / MiB:,.0f} reserved, {mem['device_total_bytes'] / MiB:,.0f} total")
    lines.append(f"queue    {q['running']} running, {q['waiting']} waiting")
    lines.append(f"\n{'SESSION':>7} {'PID':>7} {'STATE':<8} {'PHASE':<8} {'TOKENS':>7} {'KV':>7} {'BLOCKS':>6} WHERE")
    for s in r["sessions"]:
        lines.append(f"{s['id']:>7} {s['owner_pid']:>7} {s['state']:<8} {s['phase']:<8} {s['tokens']:>7} "
                     f"{s['kv_tokens']:>7} {s['kv_blocks']:>6} {s['kv_where']}")
    if not r["sessions"]:
        lines.append("    (no sessions)")
    lines.append("\ncounters")
    lines += [f"  {k:<32} {v:,.3f}" if isinstance(v, float) else f"  {k:<32} {v:,}" for k, v in r["counters"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
