"""Pictures of what djinnd measured: the memory timeline and the swap-latency distribution.
matplotlib is imported only here, and only when a picture is asked for."""
import csv

MiB = 2**20
TIMELINE_FIELDS = ("t", "kv_pool_used_bytes", "kv_pool_bytes", "host_arena_used_bytes",
                   "device_allocated_bytes", "device_reserved_bytes")


def write_timeline_csv(samples: list[dict], path: str):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TIMELINE_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(samples)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_timeline(samples: list[dict], path: str, title: str = "djinnd memory timeline"):
    plt = _pyplot()
    t0 = samples[0]["t"] if samples else 0
    t = [s["t"] - t0 for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, label in (("kv_pool_used_bytes", "KV pool used"), ("kv_pool_bytes", "KV pool budget"),
                       ("host_arena_used_bytes", "host arena used"),
                       ("device_allocated_bytes", "device allocated")):
        if samples and key in samples[0]:
            ax.plot(t, [s[key] / MiB for s in samples], label=label,
                    linestyle="--" if key == "kv_pool_bytes" else "-")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_swap_latency(ms_by_direction: dict, path: str, title: str = "KV swap latency (CDF)"):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for direction, samples in ms_by_direction.items():
        if samples:
            q = sorted(samples)
            ax.step(q, [(i + 1) / len(q) for i in range(len(q))], where="post",
                    label=f"{direction} (n={len(q)})")
    ax.set_xlabel("ms per swap")
    ax.set_ylabel("fraction of swaps")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
