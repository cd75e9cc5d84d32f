"""Smoke runs of benchmarks/overhead.py and benchmarks/oneshot_headroom.py at the smallest settings:
they run and write their fields; the arguments of benchmarks/oneshot.py."""

from __future__ import annotations

import json
import math
import sys

import pytest
from _launch_util import REPO, run
from distributed import run_distributed


def test_overhead_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--world-sizes", "2",
           "--widths", "64", "--layers", "1", "--repeats", "2", "--vocab", "64", "--timeout", "150",
           "--out", str(tmp_path)]
    run(cmd, tmp_path, timeout=180)
    doc = json.loads((tmp_path / "overhead.json").read_text())
    assert {"command", "machine", "gpt2_124m", "rows", "verdicts"} <= set(doc)
    assert set(doc["verdicts"]) == {"event_over_step", "masks_over_step", "peak_over_partition",
                                    "gather_over_event_bytes_124m"}
    (row,) = doc["rows"]
    for key in ("step_s", "event_s", "event_over_step", "hook_s", "masks_over_step", "event_bytes",
                "full_gather_bytes", "gather_over_event_bytes", "peak_extra_bytes", "partition_bytes"):
        assert row[key] is not None and row[key] >= 0, key
    # One float64 per unit and one int32 error flag per kind, every event (README Guarantee 5: never a full tensor).
    assert row["event_bytes"] == row["event_bytes_formula"] == 8 * (256 + 1) + 8
    assert doc["gpt2_124m"]["ratio_scored"] > 1000
    assert (tmp_path / "overhead.md").exists() and (tmp_path / "overhead_scaling.png").exists()


def _oneshot_benchmark():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import oneshot as bench  # benchmarks/oneshot.py (its imports are light)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return bench


def _on_small_workdir(tmp_path, script: str, *args: str, timeout: int) -> str:
    """Run ``benchmarks/SCRIPT`` on a workdir holding a 3-step plain DeepSpeed checkpoint (2 layers
    of 64 neurons) as seed 1's dense model, at the smallest settings; returns the script's path."""
    from test_oneshot import make_checkpoint

    run_distributed(make_checkpoint, 2, str(tmp_path / "dense_1"), timeout=120)
    path = str(REPO / "benchmarks" / script)
    run([sys.executable, path, str(tmp_path), "--seeds", "1", "--seq_len", "32", "--batch_size", "2",
         "--num_batches", "2", "--eval_batches", "2", "--threads", "1", "--results", str(tmp_path), *args],
        tmp_path, timeout=timeout)
    return path


def test_oneshot_headroom_benchmark_smoke(tmp_path):
    """benchmarks/oneshot_headroom.py on a 3-step plain DeepSpeed checkpoint (2 layers of 64 neurons):
    the library's global allocation, the per-layer one, a search that keeps the total and never
    raises the calibration loss, the reconstruction on the global allocation; a workdir without a
    seed's checkpoint is refused with the command that makes it."""
    script = _on_small_workdir(tmp_path, "oneshot_headroom.py", "--recon_steps", "3", "--out", "h", timeout=180)
    (r,) = json.loads((tmp_path / "h.json").read_text())["results"]
    assert r["steps"] == 3
    kept = r["kept"]
    assert sum(kept["global"]) == sum(kept["searched"]) == 32 and kept["per layer"] == [16, 16]
    assert min(kept["global"]) >= 1 and kept["reconstructed"] == kept["global"]
    assert r["calibration_loss"]["searched"] <= r["calibration_loss"]["global"]
    assert set(r["ppl"]) == {"global", "per layer", "searched", "reconstructed"}
    assert all(math.isfinite(v) for v in r["ppl"].values())
    assert [x["layer"] for x in r["reconstruction"]] == [0, 1]
    assert "| searched |" in (tmp_path / "h.md").read_text()
    out = run([sys.executable, script, str(tmp_path), "--seeds", "2"], tmp_path, timeout=60, fails=True)
    assert f"no dense checkpoint dense_2 (run `python benchmarks/oneshot.py --workdir {tmp_path}` first)" in out


def test_oneshot_mean_shift_benchmark_smoke(tmp_path):
    """benchmarks/oneshot_mean_shift.py on a 3-step plain DeepSpeed checkpoint: the one-shot command
    runs with no and with mean compensation, and on the calibration tokens (the union of its ranks'
    batches, rebuilt by the script) mean compensation leaves no mean error and never a larger one."""
    _on_small_workdir(tmp_path, "oneshot_mean_shift.py", "--scores", "bitter7", "--out", "m", timeout=240)
    (r,) = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert r["steps"] == 3 and set(r["ppl"]) == set(r["kl"]) == {"none", "mean", "mean (val.)", "mean part only"}
    none, mean = (r["error"][c]["calibration"] for c in ("none", "mean"))
    assert len(none) == len(r["kl_one_layer"]["mean"]) == 2
    for a, b in zip(none, mean):
        assert b["mean_part"] <= 1e-6 * a["mean_part"] and b["total"] <= a["total"] * (1 + 1e-6)
    assert all(0.0 <= share <= 1.0 for share in r["tokens_lower_under_mean"]["validation"])
    assert "## Summary" in (tmp_path / "m.md").read_text()


def test_oneshot_benchmark_per_layer_scope_rows_and_files(capsys):
    """--scope per_layer prunes the global-threshold rows layer by layer, keeps its cells in a file of
    its own beside the global run's, and refuses a standardized row by name."""
    bench = _oneshot_benchmark()
    args = bench.parse_args(["--scope", "per_layer"])
    assert args.out == "oneshot_per_layer"
    assert args.rows == ["magnitude", "bitter7", "fisher", "bitter7_variance", "flap raw", "obs", "bitter7_obs"]
    assert {scope for _, scope in bench.rows_for("per_layer").values()} == {"per_layer"}
    assert bench.rows_for("global") == bench.ROWS
    assert bench.cells_file("w", 1, "global").endswith("cells_1.json")
    assert bench.cells_file("w", 1, "per_layer").endswith("cells_1_per_layer.json")
    with pytest.raises(SystemExit):
        bench.parse_args(["--scope", "per_layer", "--rows", "flap", "--workdir", "w"])
    assert "--rows ['flap']: not rows of --scope per_layer" in capsys.readouterr().err
