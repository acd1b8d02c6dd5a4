"""Turn a pytest-benchmark JSON file into the markdown report and the plot.

    python -m benchmarks.report RESULTS.json [--out benchmarks/results] [--name cpu]

Writes ``NAME.json`` (a copy of the results, for ``--benchmark-compare``), ``NAME.md`` (one table
per operation and shape: time, ratio to naive, peak memory above the inputs and its ratio, the
gradients' share of it, effective TFLOP/s and the share of the device's dense peak when known,
then the targets) and ``NAME.png`` (time and peak memory against the vocabulary size, one line
per implementation).
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
TARGET_SHAPE = (8192, 1024, 32000)


def load(path: Path) -> tuple[dict, dict[tuple, dict[str, dict]]]:
    """``(run info, {(op, n, d, v, dtype): {implementation: row}})``."""
    data = json.loads(path.read_text())
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    info = {"datetime": data.get("datetime", ""), "commit": (data.get("commit_info") or {}).get("id", "")[:10]}
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        info.update(device=extra["device"], device_name=extra["device_name"], versions=extra["versions"],
                    dtype=extra["dtype"])
        key = (extra["op"], extra["n"], extra["d"], extra["v"], extra["dtype"])
        groups[key][extra["implementation"]] = {
            "time": bench["stats"]["median"], "rounds": bench["stats"]["rounds"], "flops": extra["flops"],
            "peak": extra.get("peak_bytes"), "gradients": extra.get("gradient_bytes"),
            "mismatch": extra.get("mismatch"), "unavailable": extra.get("unavailable", {})}
    return info, groups


def _peak_tflops(info) -> float | None:
    return next((peak for (name, dtype), peak in DEVICE_PEAK_TFLOPS.items()
                 if name in info["device_name"] and dtype == info["dtype"]), None)


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


def targets(groups) -> list[str]:
    """The CPU targets at N=8192, D=1024, V=32000, float32, cross-entropy fwd+bwd."""
    rows = groups.get(("ce", *TARGET_SHAPE, "torch.float32"))
    if not rows or "ours_torch" not in rows or "naive" not in rows:
        return []
    ours, naive, native = rows["ours_torch"], rows["naive"], rows.get("torch_native")
    peak_ratio = ours["peak"] / naive["peak"]
    working_ratio = (ours["peak"] - ours["gradients"]) / (naive["peak"] - naive["gradients"])
    verdict = (lambda ok: "met" if ok else "**missed**")
    lines = ["## Targets (cross-entropy fwd+bwd, N=8192, D=1024, V=32000, float32)", "",
             f"- peak memory above the inputs <= 1/20 of naive: {peak_ratio:.3f} ({1 / peak_ratio:.1f}x less), "
             f"{verdict(peak_ratio <= 0.05)}. The returned float32 gradients alone are "
             f"{ours['gradients'] / MIB:.0f} MiB = {ours['gradients'] / naive['peak']:.3f} of naive's peak"
             + (", so no implementation that returns them can meet this target with them counted"
                if ours["gradients"] > 0.05 * naive["peak"] else "")
             + f". Working memory (peak minus the gradients): ours {(ours['peak'] - ours['gradients']) / MIB:.0f} "
             f"MiB = {working_ratio:.3f} of naive's, {verdict(working_ratio <= 0.05)}.",
             f"- time <= 1.0x naive: {ours['time'] / naive['time']:.2f}x, {verdict(ours['time'] <= naive['time'])}."]
    if native:
        lines.append(f"- not slower than PyTorch's `linear_cross_entropy`: {ours['time'] / native['time']:.2f}x its "
                     f"time, {verdict(ours['time'] <= native['time'])}.")
    return lines + [""]


def write_markdown(info, groups, path: Path, plot_name: str | None) -> None:
    some = next(iter(next(iter(groups.values())).values()))
    lines = [f"# Kernel benchmarks: {info['device_name']}", "",
             f"- device: {info['device_name']}; dtype {info['dtype'].removeprefix('torch.')}; "
             f"commit {info['commit']}; {info['datetime'][:19]}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"- time: median of {some['rounds']} rounds after a warm-up call (the one whose memory is "
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
    if info["device"] == "cpu":
        lines.append("- **CPU run**: tokens and hidden size are scaled down from GPU shapes so the whole run "
                     "takes minutes on 2 cores; GPU-only implementations are listed below, not timed.")
    lines += ["", *targets(groups), *([f"![time and memory vs vocabulary size]({plot_name})", ""] if plot_name else [])]
    peak_tflops = _peak_tflops(info)
    for (op, n, d, v, dtype), rows in sorted(groups.items(), key=lambda item: (item[0][1:4], item[0][0])):
        lines += [f"## {op}: N={n}, D={d}, V={v}, {dtype.removeprefix('torch.')}", "", *table(rows, peak_tflops)]
        unavailable = next(iter(rows.values()))["unavailable"]
        if unavailable:
            lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in sorted(unavailable.items())) + "."]
        lines.append("")
    path.write_text("\n".join(lines))


def write_plot(groups, path: Path) -> bool:
    """Time and memory against V for every (op, N, D) measured at several V; False when there is none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = defaultdict(lambda: defaultdict(list))  # (op, n, d, dtype) -> implementation -> [(v, time, peak)]
    for (op, n, d, v, dtype), rows in groups.items():
        for name, row in rows.items():
            if not row["mismatch"]:
                sweeps[(op, n, d, dtype)][name].append((v, row["time"], row["peak"] / MIB))
    sweeps = {key: lines for key, lines in sweeps.items() if len({v for pts in lines.values() for v, _, _ in pts}) > 1}
    if not sweeps:
        return False
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 3.6 * len(sweeps)), squeeze=False)
    for row_axes, ((op, n, d, dtype), lines) in zip(axes, sorted(sweeps.items())):
        for name, points in sorted(lines.items()):
            points.sort()
            vocab = [p[0] for p in points]
            row_axes[0].plot(vocab, [p[1] for p in points], marker="o", label=name)
            row_axes[1].plot(vocab, [p[2] for p in points], marker="o", label=name)
        for ax, ylabel in zip(row_axes, ("time (s)", "peak memory above inputs (MiB)")):
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op}, N={n}, D={d}, {dtype.removeprefix('torch.')}")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
