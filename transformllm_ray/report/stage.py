"""Report stage: `report.md` and PNG plots of a run, from what the stages wrote.

    transformllm report --config configs/debug-local.yaml      # also the last step of `run`

Reads each stage's stats.json, convert's converted/ rows, train/metrics.jsonl and eval/eval.json, and writes
into <output_dir>/report/: report.md, accounting.png (rows in/out/rejected and reject reasons per stage),
convert.png (conversion throughput and output lengths), training.png (loss, learning rate, tokens/s, MFU),
eval.png (perplexity before/after), stage_times.png (wall time per stage). Stages that have not run are
listed as missing; the report never invents a figure. Always rerun (it is cheap and derived).
"""

from __future__ import annotations

import json
import os
import time

from transformllm_ray.config import STAGES, Config
from transformllm_ray.stage import stats_uri, write_stats
from transformllm_ray.storage import (
    exists, list_files, read_bytes, read_json, read_parquet, write_bytes_atomic, write_json_atomic,
)

STAGE = "report"


def _load(cfg: Config) -> dict:
    data: dict = {"stats": {}}
    for s in STAGES:
        if s != STAGE and exists(stats_uri(cfg, s)):
            data["stats"][s] = read_json(stats_uri(cfg, s))
    metrics = f"{cfg.stage_dir('train')}/metrics.jsonl"
    data["metrics"] = [json.loads(line) for line in read_bytes(metrics).decode().splitlines() if line.strip()] \
        if exists(metrics) else []
    ev = f"{cfg.stage_dir('eval')}/eval.json"
    data["eval"] = read_json(ev) if exists(ev) else {}
    conv = list_files(f"{cfg.stage_dir('convert')}/converted", ".parquet")
    data["converted"] = read_parquet(conv, columns=["output_tokens", "input_tokens", "seconds"]).to_pylist() \
        if conv else []
    return data


def _savefig(fig, path: str) -> str:
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())  # local folder or object store, like every other output
    return os.path.basename(path)


def plot_accounting(stats: dict, path: str) -> str | None:
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if s in stats and s != STAGE]
    if not stages:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(stages))
    w = 0.27
    for i, (k, color) in enumerate((("rows_in", "#4c72b0"), ("rows_out", "#55a868"), ("rows_rejected", "#c44e52"))):
        vals = [stats[s][k] for s in stages]
        bars = a.bar([p + (i - 1) * w for p in x], vals, w, label=k.replace("_", " "), color=color)
        a.bar_label(bars, fontsize=7)
    a.set_xticks(list(x), stages)
    a.set_ylabel("rows (records; see README for each stage's unit)")
    a.set_yscale("symlog")
    a.set_title("Rows in / out / rejected per stage")
    a.legend()
    reasons = [(s, r, n) for s in stages for r, n in sorted(stats[s].get("reject_reasons", {}).items()) if n]
    if reasons:
        labels = [f"{s}: {r}" for s, r, _ in reasons]
        bars = b.barh(range(len(reasons)), [n for _, _, n in reasons], color="#c44e52")
        b.bar_label(bars, fontsize=7)
        b.set_yticks(range(len(reasons)), labels, fontsize=8)
        b.invert_yaxis()
        b.set_xlabel("rows rejected")
        b.set_title("Reject reasons")
    else:
        b.text(0.5, 0.5, "no rejects", ha="center", va="center")
        b.axis("off")
    return _savefig(fig, path)


def plot_convert(conv_stats: dict, rows: list[dict], path: str) -> str | None:
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    out = [r["output_tokens"] for r in rows]
    a.hist(out, bins=min(30, max(5, len(out) // 3)), color="#4c72b0")
    a.set_xlabel("output tokens per converted chunk")
    a.set_ylabel("chunks")
    a.set_title(f"Generated length ({len(rows)} chunks)")
    keys = [("input_tokens", "input tokens"), ("output_tokens", "output tokens")]
    vals = [conv_stats.get(k, sum(r[k] for r in rows)) for k, _ in keys]
    bars = b.bar([lbl for _, lbl in keys], vals, color=["#8172b2", "#55a868"])
    b.bar_label(bars)
    tps = conv_stats.get("output_tokens_per_s")
    b.set_title("Conversion: " + (f"{tps:.1f} output tokens/s" if tps is not None else "tokens") +
                f", engine {conv_stats.get('engine', '?')}")
    return _savefig(fig, path)


def plot_training(metrics: list[dict], path: str) -> str | None:
    import matplotlib.pyplot as plt

    rows = [m for m in metrics if "loss" in m]
    if not rows:
        return None
    steps = [m["step"] for m in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(steps, [m["loss"] for m in rows], label="train loss", color="#4c72b0")
    val = [m for m in metrics if m.get("val_loss") is not None]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="val loss", color="#c44e52")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Loss")
    ax.legend()
    for ax, key, title, color in ((axes[0][1], "lr", "Learning rate", "#8172b2"),
                                  (axes[1][0], "tokens_per_s", "Throughput (tokens/s, all workers)", "#55a868"),
                                  (axes[1][1], "mfu", "MFU (fraction of peak)", "#dd8452")):
        pts = [(m["step"], m[key]) for m in rows if m.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), color=color)
        ax.set_xlabel("step")
        ax.set_title(title)
    axes[0][1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _savefig(fig, path)


def plot_eval(ev: dict, path: str) -> str | None:
    import matplotlib.pyplot as plt

    sets = [s for s in ("heldout_legal", "general") if ev.get(s, {}).get("base") and ev[s].get("trained")]
    if not sets:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.35
    for i, (m, color) in enumerate((("base", "#8c8c8c"), ("trained", "#4c72b0"))):
        bars = ax.bar([p + (i - 0.5) * w for p in range(len(sets))], [ev[s][m]["ppl"] for s in sets], w,
                      label=m, color=color)
        ax.bar_label(bars, fmt="%.2f")
    ax.set_xticks(range(len(sets)), [s.replace("_", " ") for s in sets])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Eval: base vs continued pre-training")
    ax.legend()
    return _savefig(fig, path)


def plot_times(stats: dict, path: str) -> str | None:
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if s in stats and s != STAGE]
    if not stages:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.barh(stages, [stats[s]["seconds"] for s in stages], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f s")
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"Stage wall time (total {sum(stats[s]['seconds'] for s in stages):.0f} s)")
    return _savefig(fig, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_markdown(cfg: Config, data: dict, images: dict[str, str | None]) -> str:
    st = data["stats"]
    lines = ["# TransformLLM-Ray run report", "", f"- output_dir: `{cfg.output_dir}`",
             f"- written: {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    lines += ["## Stages", "", "| stage | rows in | rows out | rows rejected | wall time (s) |", "|---|---:|---:|---:|---:|"]
    for s in STAGES:
        if s == STAGE:
            continue
        if s in st:
            lines.append(f"| {s} | {_fmt(st[s]['rows_in'])} | {_fmt(st[s]['rows_out'])} | "
                         f"{_fmt(st[s]['rows_rejected'])} | {st[s]['seconds']:.1f} |")
        else:
            lines.append(f"| {s} | not run | | | |")
    total = sum(st[s]["seconds"] for s in st)
    lines += ["", f"Total wall time of the stages: {total:.1f} s.", ""]
    for key, title in (("accounting", "Token and row accounting"), ("stage_times", "Wall time per stage")):
        if images.get(key):
            lines += [f"![{title}]({images[key]})", ""]
    for s in STAGES:
        if s in st and st[s].get("reject_reasons"):
            reasons = ", ".join(f"{k} {v:,}" for k, v in st[s]["reject_reasons"].items())
            lines.append(f"- {s} rejects: {reasons}")
    lines.append("")
    if "ingest" in st:
        i = st["ingest"]
        lines += ["## Ingest", "", f"{_fmt(i['rows_in'])} input records from {_fmt(i.get('files', 0))} files -> "
                  f"{_fmt(i['rows_out'])} documents -> {_fmt(i.get('chunks_out', 0))} chunks, "
                  f"{_fmt(i.get('tokens_out', 0))} tokens (tokenizer `{i.get('tokenizer')}`, "
                  f"<= {i.get('chunk_tokens')} tokens per chunk).", ""]
        nd = i.get("near_dup")
        if nd:  # data quality: what dedup took out, and what keeps the held-out set apart
            held = i.get("by_kind_split", {}).get("domain", {}).get("heldout", {}).get("docs", 0)
            lines += ["### Data quality", "", "| figure | value |", "|---|---:|",
                      f"| exact duplicates removed | {_fmt(i.get('reject_reasons', {}).get('duplicate', 0))} |",
                      f"| near-duplicates removed (estimated Jaccard >= threshold) | {_fmt(nd['removed'])} |",
                      f"| near-duplicate clusters (largest) | {_fmt(nd['clusters'])} ({_fmt(nd['largest_cluster'])}) |",
                      f"| documents given their cluster's split | {_fmt(nd['resplit'])} |",
                      f"| held-out domain documents (none with a near-copy in train or val) | {_fmt(held)} |"]
            dc = st.get("pack", {}).get("decontamination")
            if dc:  # pack's: training rows sharing an n-gram with eval text
                kinds = ", ".join(f"{k} {_fmt(v)}" for k, v in dc["rows_rejected_by_kind"].items()) or "none"
                lines += [f"| eval n-grams ({dc['ngram_words']} words) from {_fmt(dc['eval_items'])} eval items "
                          f"({_fmt(dc['eval_files'])} user files) | {_fmt(dc['eval_ngrams'])} |",
                          f"| of them common in training (> {dc['max_matches']} documents), ignored | "
                          f"{_fmt(dc.get('common_ngrams_ignored', 0))} |",
                          f"| training rows rejected as contaminated ({kinds}) | {_fmt(dc['rows_rejected'])} |"]
            lines.append("")
    if "convert" in st:
        c = st["convert"]
        lines += ["## Convert", "", "| figure | value |", "|---|---:|"]
        for k in ("engine", "model", "rows_in", "rows_out", "rows_rejected", "input_tokens", "output_tokens",
                  "output_tokens_per_s", "heldout_chunks", "seconds"):
            if k in c:
                lines.append(f"| {k} | {_fmt(c[k])} |")
        if c.get("cost"):
            cost = c["cost"]
            budget = f" (budget {cost['max_cost']:,.2f})" if cost.get("max_cost") else ""
            lines.append(f"| cost, {cost['currency']} (convert.cost prices) | {cost['total']:,.4f}{budget} |")
        lines.append("")
        if images.get("convert"):
            lines += [f"![Conversion]({images['convert']})", ""]
    if "pack" in st:
        p = st["pack"]
        lines += ["## Pack", "", "| figure | value |", "|---|---:|"]
        for k in ("tokens_in", "domain_tokens", "general_tokens", "mix_ratio_target", "mix_ratio_achieved",
                  "tokens_packed", "waste_tokens", "waste_fraction", "sequences_train", "sequences_val", "seq_len"):
            if k in p:
                lines.append(f"| {k} | {_fmt(p[k])} |")
        lines.append("")
    if "train" in st or data["metrics"]:
        t = st.get("train", {})
        lines += ["## Train", "", "| figure | value |", "|---|---:|"]
        for k in ("steps", "final_loss", "tokens_seen", "tokens_per_s", "mfu", "peak_flops_used", "params",
                  "num_workers", "seconds"):
            if k in t:
                lines.append(f"| {k} | {_fmt(t[k])} |")
        lines.append("")
        if images.get("training"):
            lines += ["![Training curves](training.png)", ""]
        if t.get("model_dir"):
            lines += [f"Exported model (Hugging Face format, loads in transformers and vLLM): `{t['model_dir']}`", ""]
    ev = data["eval"]
    if ev:
        lines += ["## Eval", "", "| set | base ppl | trained ppl | change | tokens |", "|---|---:|---:|---:|---:|"]
        for s in ("heldout_legal", "general"):
            r = ev.get(s, {})
            if r.get("base") and r.get("trained"):
                lines.append(f"| {s} | {r['base']['ppl']:.3f} | {r['trained']['ppl']:.3f} | "
                             f"{r.get('ppl_change_pct', 0):+.2f}% | {r['base']['tokens']:,} |")
        lines.append("")
        if images.get("eval"):
            lines += [f"![Eval]({images['eval']})", ""]
    return "\n".join(lines) + "\n"


def run(cfg: Config) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    t0 = time.time()
    out = cfg.stage_dir(STAGE)
    data = _load(cfg)
    images = {
        "accounting": plot_accounting(data["stats"], f"{out}/accounting.png"),
        "convert": plot_convert(data["stats"].get("convert", {}), data["converted"], f"{out}/convert.png"),
        "training": plot_training(data["metrics"], f"{out}/training.png"),
        "eval": plot_eval(data["eval"], f"{out}/eval.png"),
        "stage_times": plot_times(data["stats"], f"{out}/stage_times.png"),
    }
    md = render_markdown(cfg, data, images)
    write_bytes_atomic(f"{out}/report.md", md.encode())
    write_json_atomic(f"{out}/summary.json", {"stages": data["stats"], "eval": data["eval"],
                                              "images": {k: v for k, v in images.items() if v}})
    n = len(data["stats"])
    return write_stats(cfg, STAGE, {"rows_in": n, "rows_out": n, "rows_rejected": 0, "stages_reported": n,
                                    "report": f"{out}/report.md", "seconds": round(time.time() - t0, 3)})
