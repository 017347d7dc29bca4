"""The comparison report of ``lipkern bench``: one row per (group, case, provider) with the ratio to
lipkern, the table it prints, its plain JSON and the bar chart of the ratios (read from pytest-benchmark's
JSON)."""

from __future__ import annotations

from pathlib import Path

from lipkern.cli._common import format_columns

def _param_text(value) -> str:
    """A parameter as the table shows it: dicts (a case's size) as key=value pairs, no quotes or braces."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _case_name(bench: dict) -> str:
    params = ", ".join(_param_text(v) if isinstance(v, dict) else f"{k}={v}"
                       for k, v in (bench.get("params") or {}).items() if k != "provider")
    case = bench["name"].split("[")[0].removeprefix("test_")
    return f"{case} {params}".strip()


def _accuracy(info: dict) -> str:
    if info.get("relative_error") is not None:
        return f"rel. error {info['relative_error']:.1e}"
    if info.get("bound_over_reference") is not None:
        return f"bound/ref {info['bound_over_reference']:.4f}"
    return ""


def _reference_provider(providers) -> str | None:
    """The provider the others are compared with: 'lipkern', else the first whose name starts with it."""
    if "lipkern" in providers:
        return "lipkern"
    return next((p for p in sorted(providers) if p.startswith("lipkern")), None)


def comparison_rows(results: dict) -> list[dict]:
    """One row per (group, case, provider), lipkern first within a case, with ``ratio`` = median / lipkern's
    median (None for lipkern itself or without a lipkern row): lipkern's median from the rounds paired with
    this provider's where there are some (CPU: ``paired`` True), else from lipkern's own row."""
    cases: dict[tuple, dict] = {}
    for bench in results.get("benchmarks", []):
        info = bench.get("extra_info", {})
        provider = info.get("provider") or (bench.get("params") or {}).get("provider") or "?"
        key = (bench.get("group") or "", _case_name(bench))
        cases.setdefault(key, {})[provider] = {  # CUDA-event timings when the run had them
            "median": info.get("median_s", bench["stats"]["median"]),
            "iqr": info.get("iqr_s", bench["stats"].get("iqr")),
            "rounds": info.get("event_rounds", info.get("rounds", bench["stats"].get("rounds"))),
            "peak": info.get("peak_bytes"),
            "time_boxed": bool(info.get("time_boxed")), "accuracy": _accuracy(info),
            "implementation": info.get("implementation"), "paired_ref": info.get("paired_lipkern_median_s")}
    rows = []
    for (group, case), providers in sorted(cases.items()):
        ref = _reference_provider(providers)
        ref_median = providers[ref]["median"] if ref else None
        for provider in sorted(providers, key=lambda p: (p != ref, not p.startswith("lipkern"), p)):
            r = dict(providers[provider])
            paired_ref = r.pop("paired_ref")
            paired = bool(paired_ref) and ref == "lipkern" and provider != ref
            reference = paired_ref if paired else ref_median
            ratio = r["median"] / reference if reference and provider != ref else None
            rows.append(dict(group=group, case=case, provider=provider, ratio=ratio, paired=paired, **r))
    return rows


TABLE_WIDTH = 120


def format_table(results: dict) -> str:
    """The comparison table, one block per group (so that no line exceeds ``TABLE_WIDTH`` columns: long case
    names are shortened with '…'), columns that are empty everywhere left out, then the skipped cases."""
    env = (results.get("machine_info") or {}).get("lipkern") or {}
    lines = []
    if env:
        knobs = " ".join(f"{k}={v}" for k, v in sorted((env.get("knobs") or {}).items())) or "none"
        lines += [f"device: {env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')} | "
                  f"mode {env.get('mode')}",
                  f"TF32 matmul={env.get('tf32_matmul')} cudnn={env.get('tf32_cudnn')} | CPU threads "
                  f"{env.get('cpu_threads')} | time box {env.get('budget_s')} s per case | knobs: {knobs}"]
    rows = comparison_rows(results)
    if rows:
        show_peak = any(r["peak"] is not None for r in rows)
        show_accuracy = any(r["accuracy"] for r in rows)
        header = ["case", "provider", "median ms", "IQR %", "rounds", "ratio"] \
            + (["peak MiB"] if show_peak else []) + (["accuracy"] if show_accuracy else [])
        for group in dict.fromkeys(r["group"] for r in rows):
            body = []
            for r in (r for r in rows if r["group"] == group):
                iqr = f"{100 * r['iqr'] / r['median']:.0f}" if r["iqr"] is not None and r["median"] else "-"
                rounds = f"{r['rounds']}{'*' if r['time_boxed'] else ''}" if r["rounds"] else "-"
                row = [r["case"], r["provider"], f"{r['median'] * 1e3:.3f}", iqr, rounds,
                       f"{r['ratio']:.2f}" if r["ratio"] is not None else ""]
                row += [f"{r['peak'] / 2**20:.1f}" if r["peak"] is not None else "-"] if show_peak else []
                row += [r["accuracy"]] if show_accuracy else []
                body.append(row)
            fixed = sum(max(len(row[i]) for row in [header, *body]) + 2 for i in range(1, len(header)))
            room = max(TABLE_WIDTH - fixed, 16)
            for row in body:
                row[0] = row[0] if len(row[0]) <= room else row[0][:room - 1] + "…"
            lines += ["", f"[{group}]", *format_columns(header, body, right=set(range(2, 7)))]
        lines += ["ratio = provider median / lipkern median (> 1: lipkern is faster)"]
        if any(r["paired"] for r in rows):
            lines += ["(CPU: both medians from rounds interleaved in the provider's case, one call each per round)"]
        lines += ["plain = no Lipschitz constraint at all (the limit); "
                  "* = time-boxed (fewer rounds than asked)"]
    else:
        lines.append("no benchmark case ran")
    skipped = results.get("skipped") or []
    if skipped:
        boxed = sum(bool(s.get("time_box")) for s in skipped)
        lines.append(f"\nskipped ({len(skipped)}, {boxed} by the time box):")
        lines += [_shorten(f"{s.get('name', '')}: {s.get('reason', '')}", TABLE_WIDTH) for s in skipped]
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def comparison_json(results: dict) -> dict:
    """The comparison as plain JSON: the machine and settings, one row per (group, case, provider) with its
    median, IQR, rounds, ratio to lipkern, peak memory, accuracy and the implementation lipkern ran, and the
    skipped cases."""
    return {"environment": (results.get("machine_info") or {}).get("lipkern") or {},
            "rows": comparison_rows(results), "skipped": results.get("skipped") or []}


def write_plot(results: dict, path: str | Path) -> Path:
    """A horizontal bar chart of the ratios (log scale, 1 = as fast as lipkern). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in comparison_rows(results) if r["ratio"] is not None]
    path = Path(path)
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.28 * max(len(rows), 1)))
    if rows:
        labels = [f"{r['group']} | {r['case']} | {r['provider']}" for r in rows][::-1]
        ratios = [r["ratio"] for r in rows][::-1]
        colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
        # Bars grow from 1 (as fast as lipkern) to the ratio, on a log scale symmetric about 1.
        ax.barh(range(len(rows)), [x - 1 for x in ratios], left=1, color=colors)
        for y, x in enumerate(ratios):
            ax.annotate(f"{x:.2f}", (x, y), xytext=(3 if x >= 1 else -3, 0), textcoords="offset points",
                        ha="left" if x >= 1 else "right", va="center", fontsize=7)
        span = max(max(ratios), 1 / min(ratios), 1.5) ** 1.25
        ax.set_xscale("log")
        ax.set_xlim(1 / span, span)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
    else:
        ax.text(0.5, 0.5, "no ratios (no case ran against lipkern)", ha="center", va="center")
    env = (results.get("machine_info") or {}).get("lipkern") or {}
    ax.set_xlabel("provider median / lipkern median (> 1: lipkern faster)")
    ax.set_title(f"lipkern bench on {env.get('device', '?')} ({env.get('mode', '?')} mode)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


