"""The report of `bench.paper_toy`: the table with 95% intervals, the claims' verdicts, results.json and the plots.

Intervals: mean over seeds ± t(0.975, seeds-1) · sd / √seeds (Student t over seeds, sample standard deviation);
paired differences (DSRL - GRPO) pair runs of the same seed, which share the data order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; larger df use the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
LABELS = {"base": "warm-up (base)", "grpo": "GRPO", "dsrl": "DSRL", "nsr_prerl": "NSR-PreRL",
          "psr_prerl": "PSR-PreRL", "nsr_rl": "NSR-RL", "psr_rl": "PSR-RL"}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student t interval); the half-width is nan for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)


def _upper(values: list[float]) -> float:
    """Upper end of the 95% interval; the mean itself for a single value (no interval)."""
    mean, half = mean_ci(values)
    return mean if math.isnan(half) else mean + half


def _fmt(values: list[float], pct: bool = True) -> str:
    mean, half = mean_ci(values)
    scale = 100 if pct else 1
    return f"{mean * scale:.1f} ± {half * scale:.1f}" if not math.isnan(half) else f"{mean * scale:.1f}"


def _load(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "runs").glob("*.json"))]
    base = next(r for r in runs if r["name"] == "base")
    return base, [r for r in runs if r["name"] != "base"]


def _group(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Main-table groups: algorithm -> its runs (DSRL's at the main switch step)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["switch"] is None:
            groups.setdefault(r["algo"], []).append(r)
    return groups


def _sweep(runs: list[dict[str, Any]], groups: dict[str, list[dict[str, Any]]], switches: list[int],
           dsrl_switch: int) -> dict[int, list[dict[str, Any]]]:
    """Switch step -> runs: S=0 is GRPO, S=dsrl_switch the main DSRL runs, the rest their own runs."""
    sweep = {}
    for S in sorted(set(switches)):
        if S == 0:
            sweep[S] = groups.get("grpo", [])
        elif S == dsrl_switch:
            sweep[S] = groups.get("dsrl", [])
        else:
            sweep[S] = [r for r in runs if r["switch"] == S]
    return {S: rs for S, rs in sweep.items() if rs}


def _p(run: dict[str, Any], k: int) -> float:
    return run["pass_at_k"][str(k)]


def _verdicts(base: dict[str, Any], groups: dict[str, list[dict[str, Any]]],
              sweep: dict[int, list[dict[str, Any]]], n: int) -> list[str]:
    """One paragraph per claim: reproduces / does not / cannot tell, with the numbers."""
    lines = []
    b_avg, b_pass = base["avg"], _p(base, n)
    if "psr_prerl" in groups:
        collapsed = _upper([r["avg"] for r in groups["psr_prerl"]]) < 0.5 * b_avg
        lines.append(f"- **PSR-PreRL collapses**: {'reproduces' if collapsed else 'does not reproduce'}. "
                     f"Avg@{n} {_fmt([r['avg'] for r in groups['psr_prerl']])}% after training vs {b_avg * 100:.1f}% "
                     f"for the warm-up (criterion: the interval's upper end below half the warm-up's); "
                     f"mean response length {_fmt([r['response_len'] for r in groups['psr_prerl']], False)} tokens "
                     f"vs {base['response_len']:.1f}.")
    if "nsr_prerl" in groups and "grpo" in groups:
        g = [_p(r, n) for r in groups["grpo"]]
        s = [_p(r, n) for r in groups["nsr_prerl"]]
        narrows, keeps = _upper(g) < b_pass, _upper(s) >= b_pass
        verdict = ("reproduces" if narrows and keeps else "does not reproduce (NSR-PreRL falls below the warm-up)"
                   if not keeps else "half: NSR-PreRL keeps Pass@k, but GRPO does not narrow it here")
        lines.append(f"- **NSR-PreRL keeps or raises Pass@k at large k where GRPO narrows it**: {verdict}. "
                     f"Pass@{n}: warm-up {b_pass * 100:.1f}%, GRPO {_fmt(g)}% "
                     f"({'below' if narrows else 'not clearly below'} the warm-up), NSR-PreRL {_fmt(s)}% "
                     f"({'keeps it: interval reaches the warm-up' if keeps else 'below the warm-up'}); "
                     f"Pass@1: warm-up {_p(base, 1) * 100:.1f}%, GRPO {_fmt([_p(r, 1) for r in groups['grpo']])}%, "
                     f"NSR-PreRL {_fmt([_p(r, 1) for r in groups['nsr_prerl']])}%.")
    if "dsrl" in groups and "grpo" in groups:
        by_seed = {r["seed"]: r for r in groups["grpo"]}
        pairs = [(r, by_seed[r["seed"]]) for r in groups["dsrl"] if r["seed"] in by_seed]
        diffs = [d["avg"] - g["avg"] for d, g in pairs]
        diffs_n = [_p(d, n) - _p(g, n) for d, g in pairs]
        mean, half = mean_ci(diffs)
        significant = not math.isnan(half) and abs(mean) > half
        verdict = ("reproduces" if mean >= 0 else "does not reproduce") + \
            (" (significantly)" if significant else " in the mean, within noise")
        lines.append(f"- **DSRL ≥ GRPO at the same step budget**: {verdict}. Avg@{n}: DSRL "
                     f"{_fmt([d['avg'] for d, _ in pairs])}%, GRPO {_fmt([g['avg'] for _, g in pairs])}%, paired "
                     f"difference {_fmt(diffs)} points over {len(pairs)} seeds; Pass@{n} difference {_fmt(diffs_n)} "
                     f"points.")
    if len(sweep) >= 3:
        means = {S: mean_ci([r["avg"] for r in rs]) for S, rs in sweep.items()}
        best = max(means, key=lambda S: means[S][0])
        ends = (min(means), max(means))
        interior = best not in ends
        clear = interior and all(_upper([r["avg"] for r in sweep[e]]) < means[best][0] for e in ends)
        verdict = "reproduces" if clear else "reproduces in the means, within noise" if interior else \
            "does not reproduce"
        listing = ", ".join(f"S={S}: {_fmt([r['avg'] for r in rs])}%" for S, rs in sweep.items())
        lines.append(f"- **The switch step's inverted U**: {verdict} (best S={best}). Avg@{n}: {listing}.")
    elif sweep:
        lines.append(f"- **The switch step's inverted U**: cannot tell: the sweep has {len(sweep)} switch steps "
                     f"({', '.join(f'S={S}' for S in sweep)}), a U needs at least 3.")
    if "nsr_prerl" in groups:
        shares = {k: [r["thought_shares"][k] for r in groups["nsr_prerl"]] for k in ("reflection", "transition")}
        ratio = {k: (mean_ci(v)[0] / base["thought_shares"][k] if base["thought_shares"][k] else math.nan)
                 for k, v in shares.items()}
        lines.append(f"- **NSR-PreRL elicits reflection** (the paper: transition ×14.89, reflection ×6.54 after 20 "
                     f"steps): reflection share of the held-out answers {_fmt(shares['reflection'])}% vs "
                     f"{base['thought_shares']['reflection'] * 100:.1f}% for the warm-up (×{ratio['reflection']:.2f}), "
                     f"transition {_fmt(shares['transition'])}% vs {base['thought_shares']['transition'] * 100:.1f}% "
                     f"(×{ratio['transition']:.2f}).")
    return lines


def _table(base: dict[str, Any], groups: dict[str, list[dict[str, Any]]], n: int) -> list[str]:
    ks = sorted({1, 2, 4, 8, 16, n} & set(range(1, n + 1)))
    head = ["algorithm", "seeds", f"Avg@{n}"] + [f"Pass@{k}" for k in ks] + ["reflection", "transition", "length"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows.append("| " + " | ".join([LABELS["base"], "-", f"{base['avg'] * 100:.1f}"] +
                                  [f"{_p(base, k) * 100:.1f}" for k in ks] +
                                  [f"{base['thought_shares'][t] * 100:.1f}" for t in ("reflection", "transition")] +
                                  [f"{base['response_len']:.1f}"]) + " |")
    for algo, rs in groups.items():
        cells = [LABELS[algo], str(len(rs)), _fmt([r["avg"] for r in rs])]
        cells += [_fmt([_p(r, k) for r in rs]) for k in ks]
        cells += [_fmt([r["thought_shares"][t] for r in rs]) for t in ("reflection", "transition")]
        cells.append(_fmt([r["response_len"] for r in rs], False))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _plots(out: Path, base: dict[str, Any], groups: dict[str, list[dict[str, Any]]],
           sweep: dict[int, list[dict[str, Any]]], n: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rs: list[dict[str, Any]], key: str) -> list[float]:
        rows = [[math.nan if v is None else v for v in r["curves"][key]] for r in rs]
        return [sum(col) / len(col) for col in zip(*rows)]

    def smooth(values: list[float], width: int = 5) -> list[float]:
        return [sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1])
                for i in range(len(values))]

    names = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo, rs in groups.items():
        ax.plot(smooth(series(rs, "reward_mean")), label=LABELS[algo])
    ax.set(xlabel="RL step", ylabel="mean reward (5-step moving average, mean over seeds)",
           title="Training reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=110)
    names.append("reward_curves.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = list(range(1, n + 1))
    ax.plot(ks, [_p(base, k) for k in ks], "k--", label=LABELS["base"])
    for algo, rs in groups.items():
        means = [mean_ci([_p(r, k) for r in rs]) for k in ks]
        line, = ax.plot(ks, [m for m, _ in means], label=LABELS[algo])
        if len(rs) > 1:
            ax.fill_between(ks, [m - h for m, h in means], [m + h for m, h in means], color=line.get_color(),
                            alpha=0.15)
    ax.set(xscale="log", xlabel="k", ylabel="Pass@k (held-out)", title=f"Pass@k (n={n}; bands: 95% t over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=110)
    names.append("pass_at_k.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("reflection_share", "transition_share")):
        for algo, rs in groups.items():
            ax.plot(smooth(series(rs, key)), label=LABELS[algo])
        ax.axhline(base["thought_shares"][key.split("_")[0]], color="k", ls="--", label=LABELS["base"])
        ax.set(xlabel="RL step", ylabel=f"{key.replace('_', ' ')} of rollout steps", title=key.split("_")[0])
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "thought_shares.png", dpi=110)
    names.append("thought_shares.png")
    plt.close(fig)

    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = list(sweep)
        for metric, label in (("avg", f"Avg@{n}"), ("pass1", "Pass@1"), ("passn", f"Pass@{n}")):
            vals = [mean_ci([r["avg"] if metric == "avg" else _p(r, 1 if metric == "pass1" else n)
                             for r in sweep[S]]) for S in xs]
            ax.errorbar(xs, [m for m, _ in vals], yerr=[0 if math.isnan(h) else h for _, h in vals], marker="o",
                        capsize=3, label=label)
        ax.set(xlabel="DSRL switch step S", ylabel="held-out", title="Switch-step sweep (95% t over seeds)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "switch_sweep.png", dpi=110)
        names.append("switch_sweep.png")
        plt.close(fig)
    return names


def write_report(args: Any, *, command: str, machine: str, sha: str, seconds: float) -> Path:
    """results.md, results.json and the plots in args.out from its runs/*.json; returns results.md's path.

    seconds: this invocation's wall time; it is appended to args.out/invocations.jsonl, whose sum the report gives
    (a resumed run's time is that of all its invocations)."""
    with open(args.out / "invocations.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"command": command, "sha": sha, "seconds": seconds}) + "\n")
    invocations = [json.loads(line) for line in (args.out / "invocations.jsonl").read_text().splitlines()]
    total = sum(i["seconds"] for i in invocations)
    out, n = args.out, args.eval_n
    base, runs = _load(out)
    groups = _group(runs)
    groups = {a: groups[a] for a in ("grpo", "dsrl", "nsr_prerl", "psr_prerl", "nsr_rl", "psr_rl") if a in groups}
    sweep = _sweep(runs, groups, args.switch_steps, args.dsrl_switch)
    plots = _plots(out, base, groups, sweep, n)
    verdicts = _verdicts(base, groups, sweep, n)
    train_s = sum(r["seconds"] for r in runs)
    lines = [
        "# The paper's claims in miniature (self-correcting sums toy)", "",
        f"Command: `{command}`  ", f"Machine: {machine}  ",
        f"Code: {sha}; wall time {total / 60:.1f} min over {len(invocations)} invocation(s) (this one "
        f"{seconds / 60:.1f} min; RL runs with their evaluations {train_s / 60:.1f} min summed)", "",
        f"Setup: one supervised warm-up ({args.sft_steps} steps × {args.sft_batch}, lr {args.sft_lr:g}, "
        f"{args.sft_marginal_share:.0%} of rows without their prompt) of the "
        f"embedded 2-layer Qwen3 on {args.train_size} problems \"Compute a+b+c.\" (operands {args.low}..{args.high}), "
        f"then {args.steps} RL steps × {args.prompts} prompts × {args.rollouts} rollouts per run, conditional lr "
        f"{args.lr:g}, marginal lr {args.marginal_lr:g}, DSRL switch S={args.dsrl_switch}; every final model "
        f"answers {args.eval_size} held-out problems {n} times at temperature 1 (Avg@{n}, unbiased Pass@k).", "",
        "Intervals: mean ± 95% Student t interval over seeds (t(0.975, seeds-1) · sd/√seeds). Percentages; "
        "reflection / transition: share of the held-out answers' reasoning steps (the paper's taxonomy); length: "
        "mean response tokens. The warm-up row is one evaluation (no interval).", "",
        *_table(base, groups, n), "",
        "## The paper's claims", "", *verdicts, "",
        "## Plots", "", *[f"![{p}]({p})" for p in plots], "",
    ]
    path = out / "results.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    summary = {
        "command": command, "machine": machine, "sha": sha, "seconds": total, "invocations": invocations,
        "interval": "95% Student t over seeds",
        "base": {k: base[k] for k in ("avg", "pass_at_k", "thought_shares", "response_len")},
        "algorithms": {a: {"seeds": len(rs), "avg": mean_ci([r["avg"] for r in rs]),
                           "pass_at_k": {k: mean_ci([r["pass_at_k"][k] for r in rs]) for k in base["pass_at_k"]},
                           "thought_shares": {t: mean_ci([r["thought_shares"][t] for r in rs])
                                              for t in base["thought_shares"]}}
                       for a, rs in groups.items()},
        "switch_sweep": {str(S): {"avg": mean_ci([r["avg"] for r in rs]),
                                  f"pass@{n}": mean_ci([_p(r, n) for r in rs])} for S, rs in sweep.items()},
        "verdicts": verdicts,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return path
