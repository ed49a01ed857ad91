"""Plots of a run, written as PNG beside its metrics.jsonl: stage-1 per-layer MSE, stage-2 KL
against tokens, in-context recall against prompt length. Functions take data (records, results),
never script globals; every file is written atomically (`<name>.tmp.png`, then renamed).
"""

import json
import os

_STAGE_FILES = {1: "stage1.png", 2: "stage2.png"}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Write fig to path atomically (a reader never sees half a PNG) and close it."""
    tmp = path[:-len(".png")] + ".tmp.png" if path.endswith(".png") else path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line, from a run killed mid-write, is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _tokens_label(n: float, _pos=None) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def _yscale(ax, values: list[float]) -> None:
    """Log scale when the values span more than a decade and a half (loss curves), else linear, so a
    short run's curve does not sit between two log ticks with unreadable labels."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")


def plot_stage1(path: str, records: list[dict]) -> str | None:
    """Stage-1 MSE: training loss against step, one line per layer (rotation) or one line (all-layers
    mode), and the held-out MSE of each layer as points. None when there is nothing to plot."""
    train = [r for r in records if r.get("stage") == 1 and "loss" in r]
    val = [r for r in records if r.get("stage") == 1 and "val_mse" in r]
    if not train:
        return None
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    layers = sorted({r["layer"] for r in train if "layer" in r})
    cmap = plt.get_cmap("viridis")
    if layers:
        for n, layer in enumerate(layers):
            rows = [r for r in train if r.get("layer") == layer]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=cmap(n / max(1, len(layers) - 1)),
                    lw=1.2, label=f"layer {layer}" if len(layers) <= 8 else None)
        if len(layers) > 8:  # a colour bar instead of a legend of dozens of entries
            sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(layers[0], layers[-1]))
            fig.colorbar(sm, ax=ax, label="layer")
        else:
            ax.legend(fontsize=7)
        ax.set_title("stage 1 (rotation): training MSE of each layer", fontsize=10)
        ax.set_xlabel("optimizer step within the layer")
    else:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2)
        ax.set_title("stage 1 (all layers): training MSE, mean over layers", fontsize=10)
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE (student vs teacher output)")
    _yscale(ax, [r["loss"] for r in train])
    ax.grid(alpha=0.3, which="both")
    per_layer = [r for r in val if "layer" in r]
    if per_layer:
        bx.bar([r["layer"] for r in per_layer], [r["val_mse"] for r in per_layer], color="tab:blue")
        bx.set_xlabel("layer")
        bx.set_title("held-out MSE after training each layer", fontsize=10)
        if len(per_layer) <= 16:
            bx.set_xticks([r["layer"] for r in per_layer])
        else:
            from matplotlib.ticker import MaxNLocator
            bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    elif val:
        bx.bar(["all layers"], [val[-1]["val_mse"]], color="tab:blue", width=0.4)
        bx.set_title("held-out MSE (mean over layers)", fontsize=10)
    bx.set_ylabel("held-out MSE")
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_stage2(path: str, records: list[dict]) -> str | None:
    """Stage-2 KL(teacher || student) against training tokens: the training loss as a line, the
    held-out KL as points (labelled with the last value). None when there is nothing to plot."""
    train = [r for r in records if r.get("stage") == 2 and "loss" in r]
    val = [r for r in records if r.get("stage") == 2 and "val_kl" in r]
    if not train:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = "train_tokens" if all("train_tokens" in r for r in train + val) else "step"
    ax.plot([r[x] for r in train], [r["loss"] for r in train], lw=1.2, color="tab:blue",
            label="training loss (KL, temperature-scaled)")
    if val:
        ax.plot([r[x] for r in val], [r["val_kl"] for r in val], "o", color="tab:red", ms=6,
                label="held-out KL (temperature 1)")
        last = val[-1]
        ax.annotate(f"{last['val_kl']:.4f}", (last[x], last["val_kl"]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8, color="tab:red")
    if x == "train_tokens":
        from matplotlib.ticker import FuncFormatter
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens_label))
    ax.set_xlabel("training tokens" if x == "train_tokens" else "optimizer step")
    ax.set_ylabel("KL(teacher || student), nats/token")
    _yscale(ax, [r["loss"] for r in train] + [r["val_kl"] for r in val])
    ax.grid(alpha=0.3, which="both")
    title = "stage 2: logit distillation"
    if val and "val_ppl" in val[-1]:
        title += f" (last val: ppl {val[-1]['val_ppl']:.2f}, teacher {val[-1]['teacher_ppl']:.2f})"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_run(run_dir: str) -> str | None:
    """The stage plot of a distill.py run dir (stage1.png or stage2.png beside metrics.jsonl)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    records = read_metrics(path)
    stages = {r.get("stage") for r in records} & set(_STAGE_FILES)
    out = None
    for stage in sorted(stages):
        plot = plot_stage1 if stage == 1 else plot_stage2
        out = plot(os.path.join(run_dir, _STAGE_FILES[stage]), records) or out
    return out


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def tie_offsets(curves: dict, step: float) -> dict:
    """{name: vertical offset} for curves {name: (lengths, means)}: 0 for a curve that no other shares; curves with the
    same points (to 3 decimals, e.g. models at 0 everywhere) spread around them `step` apart, so every line stays
    visible and none is drawn off its values for the sake of the others."""
    groups = {}
    for name, (lengths, means) in curves.items():
        groups.setdefault((tuple(lengths), tuple(round(m, 3) for m in means)), []).append(name)
    return {name: step * (i - (len(g) - 1) / 2) for g in groups.values() for i, name in enumerate(g)}


def plot_recall(path: str, results: dict) -> str | None:
    """Mean recall over tasks against prompt length, one line per model (results[name]["recall"]
    ["scores"] = {task: {length: score}}). Models that tie (all at 0 or 1) are offset a little so
    every line stays visible (tie_offsets); the lengths are labelled as written (256, 512, 1K, ...)."""
    curves = {}
    for name, r in results.items():
        scores = r.get("recall", {}).get("scores")
        if scores:
            lengths = sorted({int(L) for t in scores.values() for L in t})
            curves[name] = (lengths, [sum(t[str(L)] for t in scores.values() if str(L) in t)
                                      / sum(str(L) in t for t in scores.values()) for L in lengths])
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    markers, step = "osD^v<>p", 0.015
    all_lengths = sorted({L for lengths, _ in curves.values() for L in lengths})
    offsets = tie_offsets(curves, step)
    for n, (name, (lengths, means)) in enumerate(curves.items()):  # hollow markers of decreasing size: ties show
        ax.plot(lengths, [m + offsets[name] for m in means], marker=markers[n % len(markers)], ms=max(4, 10 - 2 * n),
                mfc="none", mew=1.5, lw=1.5, label=f"{name} (mean {sum(means) / len(means):.2f})", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_lengths)
    ax.set_xticklabels([_length_label(L) for L in all_lengths])
    ax.minorticks_off()
    ax.set_xlim(all_lengths[0] / 1.3, all_lengths[-1] * 1.3)  # points off the frame
    ax.set_ylim(-0.08, 1.08)
    ax.axhline(0, color="0.6", lw=0.8, zorder=1)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("recall score, mean over tasks (0-1)")
    ax.set_title("in-context recall against prompt length" + (f" (ties offset by {step})" if any(offsets.values())
                                                                else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
