"""djinnctl: look at a running djinnd.

    djinnctl status [--json]                     model, memory, sessions, counters, recent swaps
    djinnctl swaps [--json] [--png F]            swap latency distribution per direction
    djinnctl timeline --csv F [--png F]          the memory timeline as CSV and a plot

Exit 0 ok, 1 error from the daemon, 3 daemon not running."""
import argparse
import json
import sys
import time

from libdjinn import plots
from libdjinn.client import Connection, DaemonUnavailable, DjinnError

MiB = 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="djinnctl", description="Inspect a running djinnd.")
    p.add_argument("--socket", help="daemon socket (default: DJINN_SOCKET or the runtime dir)")
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="model, device, memory, sessions and counters")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    swaps = sub.add_parser("swaps", help="swap latency distribution")
    swaps.add_argument("--json", action="store_true")
    swaps.add_argument("--png", help="write a latency CDF plot here")
    timeline = sub.add_parser("timeline", help="memory timeline as CSV and PNG")
    timeline.add_argument("--csv", required=True)
    timeline.add_argument("--png")
    args = p.parse_args(argv)
    try:
        with Connection(args.socket) as conn:
            report = conn.request(args.command)
    except DaemonUnavailable as e:
        print(f"djinnctl: djinnd is not running ({e.message})", file=sys.stderr)
        return 3
    except DjinnError as e:
        print(f"djinnctl: {e}", file=sys.stderr)
        return 1
    report.pop("type"), report.pop("id")
    print({"status": show_status, "swaps": show_swaps, "timeline": save_timeline}[args.command](report, args))
    return 0


def show_status(report: dict, args) -> str:
    return json.dumps(report, indent=1) if args.json else format_status(report)


def show_swaps(report: dict, args) -> str:
    if args.png:
        plots.plot_swap_latency(report["all_ms"], args.png)
    report.pop("all_ms")
    report.pop("latency_samples_ms", None)
    return json.dumps(report, indent=1) if args.json else format_swaps(report)


def save_timeline(report: dict, args) -> str:
    samples = report["timeline"]
    plots.write_timeline_csv(samples, args.csv)
    if args.png:
        plots.plot_timeline(samples, args.png)
    return f"{len(samples)} samples -> {args.csv}" + (f", {args.png}" if args.png else "")


def format_swaps(r: dict) -> str:
    lines = [f"{'DIR':<4} {'COUNT':>6} {'MEAN ms':>9} {'P50':>8} {'P90':>8} {'P99':>8} {'MAX':>8} "
             f"{'GB/s p50':>9} {'MiB':>9}"]
    for direction, row in r["swaps"].items():
        if row["count"]:
            lines.append(f"{direction:<4} {row['count']:>6} {row['mean']:>9.2f} {row['p50']:>8.2f} {row['p90']:>8.2f} "
                         f"{row['p99']:>8.2f} {row['max']:>8.2f} {row['gb_per_s_median']:>9.2f} "
                         f"{row['bytes'] / MiB:>9.1f}")
        else:
            lines.append(f"{direction:<4} {0:>6}")
    for name, row in r["latency_ms"].items():
        if row["count"]:
            lines.append(f"{name:<24} n={row['count']:<6} p50 {row['p50']:.2f} ms  p90 {row['p90']:.2f} ms  "
                         f"max {row['max']:.2f} ms")
    return "\n".join(lines)


def format_streaming(w: dict) -> str:
    rate = f"{w['copy_gb_per_s']:.1f} GB/s" if w["copy_gb_per_s"] else "-"
    return (f"stream   {w['resident_bytes'] / MiB:,.1f} MiB resident ({w['resident_layers']} layers), "
            f"{w['streamed_bytes'] / MiB:,.1f} MiB streamed ({w['streamed_layers']} layers); ring "
            f"{w['ring_slots']} slots, {w['ring_bytes'] / MiB:,.1f} MiB, prefetch depth {w['prefetch_depth']}; "
            f"{w['bytes_streamed'] / MiB:,.0f} MiB copied at {rate}, compute waited {w['compute_waits']} times")


def format_prefix(mem: dict, p: dict) -> str:
    return (f"prefix   sharing {p['prefix_sharing']}: {mem['kv_blocks_shared']} shared, {mem['kv_blocks_private']} "
            f"private, {mem['kv_blocks_cached']} cached blocks; hit rate {p['hit_rate']:.0%} "
            f"({p['hit_tokens']:,} of {p['query_tokens']:,} prompt tokens)")


def format_status(r: dict) -> str:
    m, mem, q = r["model"], r["memory"], r["queue"]
    block_bytes = mem["kv_pool_bytes"] / max(mem["kv_blocks_total"], 1)
    lines = [
        f"model    {m['label']}  ({m['layers']} layers, {m['dtype']}, context {m['max_model_len']})",
        f"device   {r['device']}",
        f"weights  {mem['weights_bytes'] / MiB:,.1f} MiB",
        f"kv pool  {mem['kv_blocks_used']}/{mem['kv_blocks_total']} blocks of {mem['kv_block_tokens']} tokens"
        f"  ({mem['kv_blocks_used'] * block_bytes / MiB:,.1f}/{mem['kv_pool_bytes'] / MiB:,.1f} MiB)",
        f"host     {mem['host_arena_used_bytes'] / MiB:,.1f}/{mem['host_arena_bytes'] / MiB:,.1f} MiB arena "
        f"{mem['host_arena_segment']}" + (f" (pinned in {mem['host_arena_pin_s']:.2f} s)"
                                          if mem.get("host_arena_pin_s") is not None else ""),
        f"policy   {r['policy']}",
    ]
    if "prefix_cache" in r:
        lines.insert(4, format_prefix(mem, r["prefix_cache"]))
    if "engine" in r:
        e = r["engine"]
        graphs = (f"CUDA graphs for batch {e['buckets'][0]}..{e['buckets'][-1]} ({len(e['buckets'])} buckets, captured "
                  f"in {e['capture_s']:.2f} s, {e['graph_pool_bytes'] / MiB:,.0f} MiB)" if e["cuda_graphs"] else "eager")
        lines.append(f"decode   {graphs}, {e['attention']} attention")
    if r.get("weight_streaming"):
        lines.append(format_streaming(r["weight_streaming"]))
    if r.get("tensor_parallel"):
        lines += format_ranks(r["tensor_parallel"], r["counters"])
    if "device_allocated_bytes" in mem:
        lines.append(f"vram     {mem['device_allocated_bytes'] / MiB:,.0f} MiB allocated, "
                     f"{mem['device_reserved_bytes'] / MiB:,.0f} reserved, {mem['device_total_bytes'] / MiB:,.0f} total")
    lines.append(f"queue    {q['running']} running, {q['waiting']} waiting, {q['swaps_in_flight']} swaps in flight")
    lines.append(f"\n{'SESSION':>7} {'PID':>7} {'STATE':<8} {'PHASE':<8} {'TOKENS':>7} {'KV':>7} {'BLOCKS':>6} "
                 f"{'SHARED':>6} {'HOST':>5} WHERE")
    for s in r["sessions"]:
        lines.append(f"{s['id']:>7} {s['owner_pid']:>7} {s['state']:<8} {s['phase']:<8} {s['tokens']:>7} "
                     f"{s['kv_tokens']:>7} {s['kv_blocks']:>6} {s.get('shared_blocks', 0):>6} {s['host_blocks']:>5} "
                     f"{s['kv_where']}")
    if not r["sessions"]:
        lines.append("    (no sessions)")
    lines += format_attachments(r.get("weights_export"))
    lines.append("\ncounters")
    lines += [f"  {k:<32} {v:,.3f}" if isinstance(v, float) else f"  {k:<32} {v:,}" for k, v in r["counters"].items()]
    recent = r["swaps"]["recent"]
    if recent:
        lines.append("\nrecent swaps")
        lines += [f"  session {w['session']:>4} {w['direction']:<3} {w['bytes'] / MiB:8.2f} MiB {w['ms']:8.2f} ms "
                  f"{w['gb_per_s']:7.2f} GB/s  {w['cause']}" for w in recent]
    return "\n".join(lines)


def format_ranks(tp: dict, counters: dict) -> list[str]:
    """Each tensor-parallel rank: its process, device and memory. Every rank copies its KV heads of
    the blocks rank 0's pager moves, so each rank's swap traffic is rank 0's (swap counters below)."""
    swapped = sum(counters.get(k, 0) for k in ("swap_bytes_out", "swap_bytes_in"))
    lines = [f"ranks    {tp['world']} tensor-parallel ranks ({tp.get('backend', '?')})"
             + (f", {swapped / MiB:,.1f} MiB swapped by each" if swapped else "")
             + (f"; STOPPED: {tp['dead']}" if tp.get("dead") else "")]
    lines += [f"  rank {r['rank']}  pid {r['pid']:>7}  {r['device']:<7} weights {r['weights_bytes'] / MiB:,.1f} MiB, "
              f"kv pool {r['kv_pool_bytes'] / MiB:,.1f} MiB, arena {r['host_arena_bytes'] / MiB:,.1f} MiB"
              + ("" if r.get("alive", True) else "  (gone)") for r in tp["ranks"]]
    return lines


def format_attachments(w: dict | None) -> list[str]:
    """The weights export and the processes attached to it (pid, bytes mapped, since when)."""
    if w is None:
        return []
    if not w["exported"]:
        return [f"\nweights export: none ({w['reason']})"]
    lines = [f"\nweights export: {w['kind']}, {w['bytes'] / MiB:,.1f} MiB, {len(w['attachments'])} attached",
             f"{'PID':>7} {'MAPPED MiB':>11} {'SINCE':<20} {'FOR s':>8}"]
    lines += [f"{a['pid']:>7} {a['bytes_mapped'] / MiB:>11,.1f} "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(a['since'])):<20} {a['seconds']:>8,.1f}"
              for a in w["attachments"]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
