"""Human-readable tables of results (Markdown)."""

from __future__ import annotations


def results_table(runs: dict[str, dict]) -> str:
    """One row per run: accuracy (%) per benchmark with its Wilson 95% interval, and the macro average."""
    names: list[str] = []
    for res in runs.values():
        names += [b for b in res["benchmarks"] if b not in names]
    head = "| run | " + " | ".join(f"{b} (n)" for b in names) + " | macro |"
    sep = "|---" * (len(names) + 2) + "|"
    lines = [head, sep]
    for run, res in runs.items():
        cells = []
        for b in names:
            v = res["benchmarks"].get(b)
            cells.append("-" if v is None else
                         f"{100 * v['accuracy']:.1f} [{100 * v['wilson_low']:.1f}, {100 * v['wilson_high']:.1f}] ({v['n']})")
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {100 * res['macro_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"
