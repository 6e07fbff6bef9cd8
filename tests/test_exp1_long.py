"""Experiment 1's long-context profile in miniature, with real agent processes: the table's
figures come from a real run, a full arena drops KV instead of refusing, tokens do not depend on
the policy (fp32), and the result JSON says where and when it ran."""
from experiments import exp1_agents


def test_long_profile_serves_every_turn_with_the_same_tokens_under_every_policy(tmp_path, capfd):
    result = exp1_agents.main(["--profile", "long", "--model", "random:tiny", "--device", "cpu", "--dtype", "float32",
                               "--context", "96", "--growth-min", "16", "--growth-max", "48", "--new-tokens", "8",
                               "--max-context", "400", "--sweep", "3", "--duration", "5", "--time-scale", "0.05",
                               "--stagger-s", "1", "--kv-cache-mb", "0.45", "--host-arena-mb", "0.25", "--policies", "semantic,recompute",
                               "--shared-prompt", "32",
                               "--out", str(tmp_path / "long.json")])
    semantic, recompute = result["rows"]
    for r in result["rows"]:
        assert r["refused"] == 0 and r["agents_crashed"] == 0, r["refusals"]
        assert r["ttft_resumed_ms"]["count"] > 0
        assert r["context_max"] > 96 + 8 and r["timeline_png"]
        assert r["prefix_cache"]["hit_tokens"] >= 32        # later agents found the shared system prompt cached
    assert recompute["turns_equal"] == recompute["turns_compared"] > 0 and "turns_compared" not in semantic
    assert semantic["gib_out"] > 0 and semantic["kv_drops_device"] + semantic["kv_drops_host"] > 0
    assert recompute["recompute_gpu_s"] > 0 and recompute["gib_out"] == 0
    assert {"torch", "gpu", "date", "git"} <= result.keys()
    assert set(result["largest_n"]) == {"250.0", "500.0", "1000.0"} and set(result["ran_out"]) == {"semantic", "recompute"}
    printed = capfd.readouterr().out
    assert "x the pool" in printed and "largest N with p99 resumed TTFT <= 500 ms" in printed
