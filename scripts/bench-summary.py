#!/usr/bin/env python3
"""One table from the JSON files of `wuerstchen bench` (e.g. gpu-out/bench-*.json).

    scripts/bench-summary.py gpu-out/bench-*.json

Prints, per file: device, dtype, batch, resolution, mode, the median seconds of each stage and of
the total, the first warm-up run's seconds (one-time set-up and graph captures included), and the
peak memory overall and per stage. With --targets it adds the issue's
acceptance bounds for the runs they apply to (1024x1024, prior 29 steps with guidance 4, decoder
12 steps) and says which hold (exit 1 if one does not, 2 if no run was checked); they are bounds
for one H100, so a run elsewhere is only marked.
Standard library only: it runs on the GPU machine as well as here.
"""

import argparse
import json
import sys

STAGES = ("text_encoding", "prior_loop", "decoder_loop", "vq_decode")

# (what, applies to the run?, value of the run, bound)
TARGETS = (
    ("total s, batch 1", lambda r: r["batch"] == 1 and r["offload"] == "none",
     lambda r: r["total"]["median_s"], 0.45),
    ("total s, batch 4", lambda r: r["batch"] == 4 and r["offload"] == "none",
     lambda r: r["total"]["median_s"], 1.5),
    ("peak GiB, batch 1", lambda r: r["batch"] == 1 and r["offload"] == "none",
     lambda r: peak_gib(r), 6.2),
    ("peak GiB, --offload", lambda r: r["batch"] == 1 and r["offload"] == "model",
     lambda r: peak_gib(r), 2.6),
    ("peak GiB, --sequential-offload", lambda r: r["batch"] == 1 and r["offload"] == "sequential",
     lambda r: peak_gib(r), 1.0),
    ("first-run overhead s (set-up + graph capture), batch 1",
     lambda r: r["batch"] == 1 and r.get("cuda_graphs"), lambda r: first_run_overhead(r), 5.0),
)


def first_run_overhead(run):
    """Seconds the first warm-up took beyond a timed run: the one-time set-up and graph capture."""
    warmups = run.get("warmup_s") or []
    return warmups[0] - run["total"]["median_s"] if warmups else None


def peak_gib(run):
    peak = run.get("peak_memory")
    return None if not peak else peak.get("gib")


def mode(run):
    parts = [run.get("dtype", "?")]
    if run.get("offload", "none") != "none":
        parts.append(run["offload"] + " offload")
    if run.get("cuda_graphs"):
        parts.append("graphs")
    if run.get("channels_last"):
        parts.append("channels-last")
    if run.get("cudnn_benchmark"):
        parts.append("cudnn-benchmark")
    if run.get("project_text_kv") and run.get("device_type") == "cuda":
        parts.append("text kv once")
    return ", ".join(parts)


def is_reference_workload(run):
    return (run.get("resolution") == "1024x1024" and run.get("prior_steps") == 29
            and run.get("prior_guidance") == 4 and run.get("decoder_steps") == 12
            and run.get("dtype") == "fp16")


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="bench JSON files")
    parser.add_argument("--targets", action="store_true", help="check the acceptance bounds")
    args = parser.parse_args()

    runs = []
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as f:
                runs.append((path, json.load(f)))
        except (OSError, ValueError) as e:
            print(f"{path}: skipped ({e})", file=sys.stderr)

    header = ("file", "device", "mode", "batch", "size", *STAGES, "total", "first run",
              "peak GiB", "stage peaks GiB (text, prior, decoder, vq)")
    rows = [header]
    for path, r in runs:
        stages = [fmt(r["stages"][s]["median_s"]) for s in STAGES]
        peak = r.get("peak_memory") or {}
        by_stage = peak.get("stages_gib") or {}
        rows.append((path.rsplit("/", 1)[-1], r.get("device", "?"), mode(r), str(r.get("batch")),
                     r.get("resolution", "?"), *stages, fmt(r["total"]["median_s"]),
                     fmt((r.get("warmup_s") or [None])[0]), fmt(peak.get("gib")),
                     " ".join(fmt(by_stage.get(s)) for s in STAGES)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())

    if not args.targets:
        return 0
    print()
    failed = False
    checked = 0
    for path, r in runs:
        if not is_reference_workload(r):
            continue
        for what, applies, value, bound in TARGETS:
            if not applies(r):
                continue
            v = value(r)
            checked += 1
            ok = v is not None and v <= bound
            failed |= not ok
            where = "" if "H100" in r.get("device", "") else " (not an H100: indicative only)"
            print(f"{'ok  ' if ok else 'MISS'} {path.rsplit('/', 1)[-1]}: {what} {fmt(v)} "
                  f"(bound {bound}){where}")
    if checked == 0:
        print("no bound checked: no run is the reference workload (1024x1024, fp16, prior 29 "
              "steps at guidance 4, decoder 12 steps)")
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
