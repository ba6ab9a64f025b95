#!/usr/bin/env python3
"""Where the GPU time of a `wuerstchen bench --profile` run went (its Kineto Chrome trace).

    scripts/profile-summary.py gpu-out/profile-trace.json[.gz] [--top N]

Each GPU activity (kernel, memcpy, memset) is traced back through its correlation id to the CUDA
runtime call that launched it, and from that call's thread and time to the host scopes around
it: the bench's stage ("stage:prior_loop"), the model block ("block:AttnBlock", --profile sets
these), the outermost ATen op under the block (the layer-level op, e.g. aten::layer_norm with the
copy inside it) and the innermost one (e.g. aten::copy_). Prints, per stage: GPU busy time and
activity count, the time per block type, the top outermost and innermost ops; then the top
kernels of the whole run. Standard library only: it runs on the GPU machine as well as here.
"""

import argparse
import collections
import gzip
import json
import sys

HOST_SCOPES = ("cpu_op", "user_annotation")
LAUNCHES = ("cuda_runtime", "cuda_driver")
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]


def number(value, default=0.0):
    return float(value) if isinstance(value, (int, float)) else default


def where(stack):
    """(stage, block, outermost op, innermost op) of a stack of host scopes, outermost first."""
    stage = block = outer = inner = None
    for _, scope in stack:
        name = scope.get("name", "?")
        if scope.get("cat") == "user_annotation":
            if name.startswith("stage:"):
                stage, block, outer, inner = name[6:], None, None, None
            elif name.startswith("block:"):
                block, outer, inner = name[6:], None, None
        else:
            if outer is None:
                outer = name
            inner = name
    return (stage or "(no stage)", block or "(outside blocks)", outer or "(no op)",
            inner or "(no op)")


def attribute_launches(events):
    """Where each launch happened: {correlation id of a runtime call: where(...)} and, as a
    fallback for activities whose call is missing, {External id of a host op: where(...)}."""
    by_thread = collections.defaultdict(list)  # (pid, tid) -> [(ts, -dur, kind, event)]
    for e in events:
        cat = e.get("cat")
        if cat in HOST_SCOPES or cat in LAUNCHES:
            key = (e.get("pid"), e.get("tid"))
            # Scopes before launches at the same time, longer scopes first (they enclose).
            order = 0 if cat in HOST_SCOPES else 1
            by_thread[key].append((number(e.get("ts")), order, -number(e.get("dur")), e))
    by_correlation, by_external = {}, {}
    for items in by_thread.values():
        items.sort(key=lambda item: item[:3])
        stack = []  # open scopes, outermost first: (end, event)
        for ts, order, neg_dur, e in items:
            while stack and stack[-1][0] <= ts:
                stack.pop()
            if order == 0:
                stack.append((ts - neg_dur, e))
                external = e.get("args", {}).get("External id")
                if e.get("cat") == "cpu_op" and external is not None:
                    by_external[external] = where(stack)
                continue
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                by_correlation[corr] = where(stack)
    return by_correlation, by_external


def table(rows, total, top, header):
    lines = ["  %-58s %9s %7s %6s" % (header, "ms", "calls", "share")]
    for name, (us, calls) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        share = us / total if total else 0.0
        label = name if len(name) <= 58 else name[:55] + "..."
        lines.append("  %-58s %9.3f %7d %5.1f%%" % (label, us / 1e3, calls, 100 * share))
    return lines


def summarize(events, top):
    by_correlation, by_external = attribute_launches(events)
    unattributed = 0
    stages = collections.OrderedDict()
    kernels = collections.defaultdict(lambda: [0.0, 0])
    all_us = 0.0
    for e in sorted((e for e in events if e.get("cat") in GPU_WORK),
                    key=lambda e: number(e.get("ts"))):
        us = number(e.get("dur"))
        all_us += us
        k = kernels[e.get("name", "?")]
        k[0] += us
        k[1] += 1
        args = e.get("args", {})
        place = by_correlation.get(args.get("correlation"), by_external.get(args.get("External id")))
        if place is None:
            unattributed += 1
            place = ("(unattributed)", "(outside blocks)", "(no op)", "(no op)")
        stage, block, outer, inner = place
        s = stages.setdefault(stage, {"us": 0.0, "count": 0,
                                      "blocks": collections.defaultdict(lambda: [0.0, 0]),
                                      "outer": collections.defaultdict(lambda: [0.0, 0]),
                                      "inner": collections.defaultdict(lambda: [0.0, 0])})
        s["us"] += us
        s["count"] += 1
        for key, name in (("blocks", block), ("outer", outer), ("inner", inner)):
            s[key][name][0] += us
            s[key][name][1] += 1

    lines = ["GPU busy time %.3f ms in %d activities (kernels, copies, sets)" %
             (all_us / 1e3, sum(k[1] for k in kernels.values()))]
    if unattributed:
        lines.append("%d activities had no launching call in the trace" % unattributed)
    for stage, s in stages.items():
        lines.append("")
        lines.append("== %s: %.3f ms of GPU time, %d activities" % (stage, s["us"] / 1e3,
                                                                  s["count"]))
        lines += table({k: tuple(v) for k, v in s["blocks"].items()}, s["us"], top, "block")
        lines += table({k: tuple(v) for k, v in s["outer"].items()}, s["us"], top,
                       "outermost op")
        lines += table({k: tuple(v) for k, v in s["inner"].items()}, s["us"], top,
                       "innermost op")
    lines.append("")
    lines.append("== top kernels of the run")
    lines += table({k: tuple(v) for k, v in kernels.items()}, all_us, top, "kernel")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="Chrome trace from `wuerstchen bench --profile`")
    parser.add_argument("--top", type=int, default=12, help="rows per table (default 12)")
    args = parser.parse_args()
    try:
        events = load_events(args.trace)
    except (OSError, ValueError) as e:
        print("%s: cannot read the trace: %s" % (args.trace, e), file=sys.stderr)
        return 1
    if not any(e.get("cat") in GPU_WORK for e in events):
        print("%s: no GPU activity in the trace" % args.trace, file=sys.stderr)
        return 1
    print("\n".join(summarize(events, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
