"""Turn a pytest-benchmark JSON file into the markdown report and the plot.

    python -m benchmarks.report RESULTS.json [--out benchmarks/results] [--name cpu]

Writes ``NAME.json`` (a copy of the results, for ``--benchmark-compare``), ``NAME.md`` (the device
with its vector units and, on CPU, the GEMM operand dtype of our cpu backend per input dtype; the
targets table of our default backend against naive; then one table per operation, shape and dtype:
time, ratio to naive, peak memory above the inputs and its ratio, the gradients' share of it,
effective TFLOP/s and the share of the device's dense peak when known) and ``NAME.png`` (time and
peak memory as ratios to naive against the vocabulary size, one line per implementation).
"""
import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path

MIB = 2**20
# dense tensor-core peaks (TFLOP/s) by device-name fragment and dtype; CPUs have none listed
DEVICE_PEAK_TFLOPS = {("H100", "torch.bfloat16"): 989.0, ("H200", "torch.bfloat16"): 989.0,
                      ("A100", "torch.bfloat16"): 312.0}
# our default backend (what backend="auto" picks) per device type: the first of these the run has
DEFAULT_IMPLEMENTATION = {"cpu": ("ours_cpu", "ours_torch"), "cuda": ("ours_triton",)}
# targets of the default backend, as ratios to naive: time per (op, dtype), and peak memory (gradients included)
TIME_TARGETS = {("ce", "torch.bfloat16"): 0.7, ("logprobs_entropy", "torch.bfloat16"): 1.0,
                ("ce", "torch.float32"): 0.7, ("logprobs_entropy", "torch.float32"): 0.9}
MEMORY_TARGET = 0.3
CEILINGS = {"gemm_ceiling"}  # benchmarks.implementations.CEILINGS (not imported: this module needs no torch)


def load(path: Path) -> tuple[dict, dict[tuple, dict[str, dict]]]:
    """``(run info, {(op, n, d, v, dtype): {implementation: row}})``."""
    data = json.loads(path.read_text())
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    info = {"datetime": data.get("datetime", ""), "commit": (data.get("commit_info") or {}).get("id", "")[:10],
            "dtypes": [], "cpu_backend": None, "padding": None}
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        info.update(device=extra["device"], device_name=extra["device_name"], versions=extra["versions"])
        info["cpu_backend"] = extra.get("cpu_backend") or info["cpu_backend"]
        if extra["dtype"] not in info["dtypes"]:
            info["dtypes"].append(extra["dtype"])
        if "ignored_tokens" in extra:  # the largest share of ignored targets
            share = max(extra["ignored_tokens"] / extra["n"], (info["padding"] or {}).get("share", 0.0))
            info["padding"] = {"index": extra["ignore_index"], "every": extra.get("ignore_every"), "share": share}
        key = (extra["op"], extra["n"], extra["d"], extra["v"], extra["dtype"])
        groups[key][extra["implementation"]] = {
            "time": bench["stats"]["median"], "rounds": bench["stats"]["rounds"], "flops": extra["flops"],
            "peak": extra.get("peak_bytes"), "gradients": extra.get("gradient_bytes"),
            "mismatch": extra.get("mismatch"), "unavailable": extra.get("unavailable", {})}
    return info, groups


def _peak_tflops(info, dtype: str) -> float | None:
    return next((peak for (name, peak_dtype), peak in DEVICE_PEAK_TFLOPS.items()
                 if name in info["device_name"] and peak_dtype == dtype), None)


def _dtype(dtype: str) -> str:
    return dtype.removeprefix("torch.")


def table(rows: dict[str, dict], peak_tflops: float | None) -> list[str]:
    naive, gemms = rows.get("naive"), rows.get("gemm_ceiling")
    lines = [("| implementation | time (s) | vs naive | vs GEMMs | peak above inputs (MiB) | vs naive "
              "| gradients (MiB) | working (MiB) | vs naive | TFLOP/s | % of peak |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(rows.items(), key=lambda item: (item[0] != "naive", item[1]["time"])):
        if row["mismatch"]:
            lines.append(f"| {name} | mismatch: {row['mismatch']} (not timed) | | | | | | | | | |")
            continue
        working = row["peak"] - row["gradients"]
        ratio = (lambda ours, base: f"{ours / base:.2f}x" if naive and base else "-")
        vs_gemms = f"{row['time'] / gemms['time']:.2f}x" if gemms else "-"
        tflops = row["flops"] / row["time"] / 1e12
        share = f"{100 * tflops / peak_tflops:.0f}%" if peak_tflops else "n/a"
        lines.append(
            f"| {name} | {row['time']:.4f} | {ratio(row['time'], naive['time'] if naive else 0)} "
            f"| {vs_gemms} "
            f"| {row['peak'] / MIB:.0f} | {ratio(row['peak'], naive['peak'] if naive else 0)} "
            f"| {row['gradients'] / MIB:.0f} | {working / MIB:.0f} "
            f"| {ratio(working, naive['peak'] - naive['gradients'] if naive else 0)} | {tflops:.3f} | {share} |")
    return lines


def default_implementation(device: str, rows: dict[str, dict]) -> str | None:
    """Our default backend's row name in a group: ``ours_cpu`` on CPU (``ours_torch`` where the run had no
    cpu extension), ``ours_triton`` on GPU; None when none of them ran."""
    return next((name for name in DEFAULT_IMPLEMENTATION.get(device, ()) if name in rows), None)


def fastest(rows: dict[str, dict]) -> str | None:
    """The fastest implementation of a group that computes the loss (ceilings and mismatches left out)."""
    timed = {name: row["time"] for name, row in rows.items() if name not in CEILINGS and not row["mismatch"]}
    return min(timed, key=timed.get) if timed else None


def target_rows(device: str, groups) -> list[dict]:
    """For each group with naive and our default backend: the time and peak-memory ratios to naive, their
    targets (None where the op has no time target) and whether they are met, and the group's fastest."""
    results = []
    for (op, n, d, v, dtype), rows in sorted(groups.items(), key=lambda item: (item[0][4], item[0][1:4], item[0][0])):
        ours, naive = default_implementation(device, rows), rows.get("naive")
        if ours is None or naive is None or naive["mismatch"]:
            continue
        row = rows[ours]
        result = {"op": op, "n": n, "d": d, "v": v, "dtype": dtype, "implementation": ours,
                  "mismatch": row["mismatch"], "time_target": TIME_TARGETS.get((op, dtype)),
                  "memory_target": MEMORY_TARGET, "fastest": fastest(rows)}
        if not row["mismatch"]:
            result.update(time=row["time"] / naive["time"], memory=row["peak"] / naive["peak"],
                          working=(row["peak"] - row["gradients"]) / max(naive["peak"] - naive["gradients"], 1))
            result.update(time_met=None if result["time_target"] is None else result["time"] <= result["time_target"],
                          memory_met=result["memory"] <= MEMORY_TARGET,
                          fastest_ratio=rows[result["fastest"]]["time"] / naive["time"])
        results.append(result)
    return results


def targets(info, groups) -> list[str]:
    """The targets section: one row per (op, shape, dtype), our default backend against naive."""
    results = target_rows(info["device"], groups)
    if not results:
        return []
    verdict = (lambda ok: "-" if ok is None else "met" if ok else "**missed**")
    names = sorted({r["implementation"] for r in results})
    lines = ["## Targets", "",
             f"Our default backend ({', '.join(f'`{name}`' for name in names)}, what `backend='auto'` picks here) "
             "against naive, per operation, shape and input dtype: time <= "
             + ", ".join(f"{t}x for {op} {_dtype(dtype)}" for (op, dtype), t in TIME_TARGETS.items())
             + f"; peak memory above the inputs, the returned gradients included, <= {MEMORY_TARGET}x naive's "
             "(`working`: without the gradients, for reference); and the fastest implementation of its group, "
             f"{', '.join(f'`{name}`' for name in sorted(CEILINGS))} aside.", "",
             "| op | N | D | V | dtype | time vs naive | target | | peak vs naive | target | | working vs naive "
             "| fastest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    checks = []
    for r in results:
        shape = f"| {r['op']} | {r['n']} | {r['d']} | {r['v']} | {_dtype(r['dtype'])} "
        if r["mismatch"]:
            lines.append(shape + f"| {r['implementation']} mismatch: {r['mismatch']} | | **missed** | | | **missed** "
                         "| | no |")
            checks += [False, False]
            continue
        time_target = "-" if r["time_target"] is None else f"<= {r['time_target']}x"
        is_fastest = r["fastest"] == r["implementation"]
        fastest_cell = "yes" if is_fastest else f"**no**: {r['fastest']} ({r['fastest_ratio']:.2f}x naive)"
        lines.append(shape + f"| {r['time']:.2f}x | {time_target} | {verdict(r['time_met'])} "
                     f"| {r['memory']:.2f}x | <= {r['memory_target']}x | {verdict(r['memory_met'])} "
                     f"| {r['working']:.2f}x | {fastest_cell} |")
        checks += [ok for ok in (r["time_met"], r["memory_met"], is_fastest) if ok is not None]
    lines += ["", f"{sum(checks)} of {len(checks)} checks met (time, memory and fastest, where the op has them).", ""]
    return lines


def compute_lines(info, groups) -> list[str]:
    """On CPU: the GEMM operand dtype our cpu backend used for each input dtype of the run."""
    if info["device"] != "cpu":
        return []
    backend = info["cpu_backend"]
    if backend is None:
        reasons = {row["unavailable"].get("ours_cpu") for rows in groups.values() for row in rows.values()}
        reason = next((r for r in reasons if r), "not recorded in these results")
        return [f"- our cpu backend (`ours_cpu`): not run ({reason})"]
    compute = "; ".join(f"{_dtype(dtype)} inputs: {backend['compute'].get(dtype, 'not recorded')}"
                        for dtype in info["dtypes"])
    return [f"- our cpu backend (`ours_cpu`, what `backend='auto'` picks for CPU tensors; extension variant "
            f"{backend['variant']}), GEMM operands per input dtype (float32 accumulation): {compute}"]


def write_markdown(info, groups, path: Path, plot_name: str | None) -> None:
    some = next(iter(next(iter(groups.values())).values()))
    rounds = "one timed round" if some["rounds"] == 1 else f"median of {some['rounds']} timed rounds"
    lines = [f"# Kernel benchmarks: {info['device_name']}", "",
             f"- device: {info['device_name']}; input dtypes {', '.join(_dtype(d) for d in info['dtypes'])}; "
             f"commit {info['commit']}; {info['datetime'][:19]}",
             *compute_lines(info, groups),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"- time: {rounds} after a warm-up call (the one whose memory is "
             "measured); one call is a whole forward "
             "(+ backward) over all tokens. TFLOP/s counts 6·N·D·V (2·N·D·V forward-only).",
             "- memory: peak allocated above the inputs during one call, the returned gradients included "
             "(`gradients` column: (N+V)·D elements in the input dtype); `working` = peak minus gradients."
             + (" Measured from the CPU allocator's events (`torch.profiler`, `profile_memory=True`)."
                if info["device"] == "cpu" else " `torch.cuda.max_memory_allocated`."),
             "- every implementation's outputs and gradients were checked against float64 on the first 256 "
             "tokens before it was timed, except `gemm_ceiling`: the same shape's GEMMs alone in the input dtype "
             "(the logits product, and the two gradient products when trained), computing no loss; `vs GEMMs` "
             "is the time over it."]
    if info["padding"]:
        padding = info["padding"]
        which = f"every {padding['every']}th target" if padding["every"] else "some targets"
        lines.append(f"- padding: {which} is `ignore_index` ({padding['index']}), up to {padding['share']:.1%} of the "
                     "tokens, as in real batches: cross-entropy is the mean over the other tokens, and the logprobs "
                     "and entropy are 0 there (implementations without an `ignore_index` of their own have their "
                     "outputs masked).")
    if info["device"] == "cpu":
        lines.append("- **CPU run**: tokens and hidden size are scaled down from GPU shapes so the whole run "
                     "takes about half an hour on 2 cores; GPU-only implementations are listed below, not timed.")
    lines += ["", *targets(info, groups),
              *([f"![time and memory vs vocabulary size]({plot_name})", ""] if plot_name else [])]
    for (op, n, d, v, dtype), rows in sorted(groups.items(), key=lambda item: (item[0][1:4], item[0][0], item[0][4])):
        lines += [f"## {op}: N={n}, D={d}, V={v}, {_dtype(dtype)}", "", *table(rows, _peak_tflops(info, dtype))]
        unavailable = next(iter(rows.values()))["unavailable"]
        if unavailable:
            lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in sorted(unavailable.items())) + "."]
        lines.append("")
    path.write_text("\n".join(lines))


def write_plot(groups, path: Path) -> bool:
    """Time and peak memory as ratios to naive against V, for every (op, D, dtype) measured at several V
    (the token count may differ between them: the ratios compare at equal shape), with the targets of
    :data:`TIME_TARGETS` and :data:`MEMORY_TARGET` dashed; False when there is no such sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = defaultdict(lambda: defaultdict(list))  # (op, d, dtype) -> implementation -> [(v, n, time, peak)]
    for (op, n, d, v, dtype), rows in groups.items():
        naive = rows.get("naive")
        if naive is None or naive["mismatch"]:
            continue
        for name, row in rows.items():
            if not row["mismatch"]:
                sweeps[(op, d, dtype)][name].append((v, n, row["time"] / naive["time"], row["peak"] / naive["peak"]))
    sweeps = {key: lines for key, lines in sweeps.items() if len({p[0] for pts in lines.values() for p in pts}) > 1}
    if not sweeps:
        return False
    names = sorted({name for lines in sweeps.values() for name in lines})
    colors = {name: f"C{index % 10}" for index, name in enumerate(names)}  # one colour per implementation throughout
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 3.6 * len(sweeps)), squeeze=False)
    for row_axes, ((op, d, dtype), lines) in zip(axes, sorted(sweeps.items())):
        shapes = sorted({(p[0], p[1]) for points in lines.values() for p in points})
        for name, points in sorted(lines.items()):
            points.sort()
            vocab = [p[0] for p in points]
            row_axes[0].plot(vocab, [p[2] for p in points], marker="o", label=name, color=colors[name])
            row_axes[1].plot(vocab, [p[3] for p in points], marker="o", label=name, color=colors[name])
        for ax, target in zip(row_axes, (TIME_TARGETS.get((op, dtype)), MEMORY_TARGET)):
            if target is not None:
                ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}x")
        for ax, ylabel in zip(row_axes, ("time / naive's", "peak memory above inputs / naive's")):
            ax.set_xscale("log")
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op}, D={d}, {_dtype(dtype)}; N " + ", ".join(f"{n} at V={v}" for v, n in shapes),
                         fontsize=9)
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _slug(device_name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return "-".join("".join(c if c.isalnum() else " " for c in device_name.lower()).split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="file stem (default: the device type)")
    args = parser.parse_args()
    info, groups = load(args.results)
    if not groups:
        raise SystemExit(f"{args.results} holds no benchmarks")
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or (info["device"] if info["device"] == "cpu" else _slug(info["device_name"]))
    if args.results.resolve() != (args.out / f"{name}.json").resolve():
        shutil.copyfile(args.results, args.out / f"{name}.json")
    plotted = write_plot(groups, args.out / f"{name}.png")
    write_markdown(info, groups, args.out / f"{name}.md", f"{name}.png" if plotted else None)
    print(f"wrote {args.out / name}.md{', .png' if plotted else ''} and .json")


if __name__ == "__main__":
    main()
