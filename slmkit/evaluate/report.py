"""`report.md` and a self-contained `report.html` (plots embedded as base64 PNGs) for a recipe run.

What it shows, in order: the recommendation and why; the candidates table (size, speed, quality) with the
Pareto fronts marked; the Pareto charts (quality vs bytes, quality vs decode speed); training curves of every
training stage (loss by step, held-out bits per byte where evaluated); the per-stage table (kind, time,
cached, headline metrics); provenance (recipe, machine, output paths).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

COLUMNS = [  # (field, header, format)
    ("bytes_on_disk", "bytes", lambda v: _bytes(v)),
    ("parameters", "params", lambda v: f"{v / 1e6:.2f}M"),
    ("nonzero_parameters", "nonzero", lambda v: f"{v / 1e6:.2f}M"),
    ("decode_tok_s_b1", "decode tok/s (b1)", lambda v: f"{v:,.0f}"),
    ("decode_tok_s_b8", "decode tok/s (b8)", lambda v: f"{v:,.0f}"),
    ("ttft_ms", "TTFT ms", lambda v: f"{v:.1f}"),
    ("peak_rss_bytes", "peak RSS", lambda v: _bytes(v)),
    ("bits_per_byte", "bits/byte", lambda v: f"{v:.4f}"),
    ("ood_bits_per_byte", "bits/byte (out of domain)", lambda v: f"{v:.4f}"),
    ("next_line_acc", "next-line acc", lambda v: f"{v:.1%}"),
    ("parse_rate", "parse rate", lambda v: f"{v:.1%}"),
    ("exec_pass_rate", "exec pass rate", lambda v: f"{v:.1%}"),
]


def _bytes(v: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} B"


def candidates_table(selection: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: references (e.g. the teacher) first, then candidates; marks front and choice."""
    rows_in = [(f"{n} (reference)", r) for n, r in selection.get("references", {}).items()]
    rows_in += list(selection.get("candidates", {}).items())
    present = [c for c in COLUMNS if any(c[0] in r and r[c[0]] is not None for _, r in rows_in)]
    header = ["model", *[c[1] for c in present], "notes"]
    fronts = selection.get("fronts", {})
    rows = []
    for name, r in rows_in:
        notes = []
        if name == selection.get("recommended"):
            notes.append("**recommended**")
        if name in fronts.get("bytes", []):
            notes.append("front: quality/bytes")
        if name in fronts.get("decode", []):
            notes.append("front: quality/speed")
        if selection.get("feasible") is not None and name in selection.get("candidates", {}) \
                and name not in selection["feasible"]:
            notes.append("outside budget")
        rows.append([name, *[(c[2](r[c[0]]) if r.get(c[0]) is not None else "–") for c in present],
                     ", ".join(notes)])
    return header, rows


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def pareto_chart(selection: dict, x_field: str, x_label: str, log_x: bool = False) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj = selection.get("objective", "bits_per_byte")
    points = [(n, r, False) for n, r in selection.get("candidates", {}).items()]
    points += [(n, r, True) for n, r in selection.get("references", {}).items()]
    points = [(n, r, ref) for n, r, ref in points if r.get(x_field) is not None and r.get(obj) is not None]
    if not points:
        return None
    front_key = "bytes" if x_field == "bytes_on_disk" else "decode"
    front = set(selection.get("fronts", {}).get(front_key, []))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n, r, ref in points:
        chosen = n == selection.get("recommended")
        ax.scatter(r[x_field], r[obj], s=90 if chosen else 40, marker="*" if chosen else ("s" if ref else "o"),
                   color="tab:red" if chosen else ("tab:gray" if ref else ("tab:blue" if n in front else "tab:cyan")),
                   zorder=3)
        ax.annotate(n, (r[x_field], r[obj]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    line = sorted((r[x_field], r[obj]) for n, r, _ in points if n in front)
    if len(line) > 1:
        ax.plot(*zip(*line), color="tab:blue", lw=1, alpha=0.6, zorder=2)
    if log_x:
        ax.set_xscale("log")
    if x_field == "bytes_on_disk":
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _bytes(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel(x_label)
    ax.set_ylabel(obj.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.set_title(f"{obj.replace('_', ' ')} vs {x_label} (front in blue, ★ recommended)", fontsize=9)
    return _png(fig)


def training_curves(stage_dirs: dict[str, Path]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, d in stage_dirs.items():
        f = Path(d) / "metrics.jsonl"
        if not f.exists():
            continue
        recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"], r["val_bits_per_byte"]) for r in recs if "val_bits_per_byte" in r]
        if train:
            series[name] = (train, val)
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, (train, val) in series.items():
        axes[0].plot(*zip(*train), label=name, lw=1.2)
        if val:
            axes[1].plot(*zip(*val), marker="o", label=name, lw=1.2)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss (nats/token)")
    axes[1].set(title="held-out bits per byte", xlabel="step", ylabel="bits/byte")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def stage_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        m = r.get("metrics", {})
        head = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in list(m.items())[:5])
        rows.append([r["name"], r["kind"], f"{r.get('seconds', 0):.1f}s", "yes" if r.get("cached") else "no",
                     head, r.get("output", "")])
    return rows


def write_report(out_dir: str | Path, *, title: str, records: list[dict], selection: dict | None,
                 machine: dict | None = None, recipe_source: str | None = None,
                 wall_seconds: float | None = None) -> dict[str, Path]:
    """Write report.md (+ PNGs beside it) and a self-contained report.html; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    if selection:
        for key, (field, label, log) in {"pareto_bytes": ("bytes_on_disk", "bytes on disk", True),
                                         "pareto_speed": ("decode_tok_s_b1", "decode tokens/s (batch 1)", False)
                                         }.items():
            png = pareto_chart(selection, field, label, log)
            if png:
                images[key] = png
    curves = training_curves({r["name"]: Path(r["output"]) for r in records
                              if r.get("kind") in ("train", "distill", "sft", "dpo")})
    if curves:
        images["training_curves"] = curves
    for name, data in images.items():
        (out / f"{name}.png").write_bytes(data)

    sections: list[tuple[str, str]] = []  # (heading, markdown body); the HTML renders the same content
    if selection:
        rec = selection.get("recommended")
        body = (f"**Recommended: {rec}**" if rec else "**No candidate meets the budget.**") + "\n\n"
        body += f"Objective: {selection.get('objective')}; budget: {selection.get('budget') or 'none'}.\n\n"
        body += "\n".join(f"- {r}" for r in selection.get("reasons", []))
        sections.append(("Recommendation", body))
        header, rows = candidates_table(selection)
        sections.append(("Candidates", _md_table(header, rows)))
    shipped = [r for r in records if r.get("kind") == "export" and "slmkit_bits_per_byte" in r.get("metrics", {})]
    if shipped:
        from ..export.verify import describe

        sections.append(("Shipped file", "\n".join(
            f"- `{r['metrics'].get('file', r.get('output', ''))}` ({_bytes(r['metrics']['bytes'])}): "
            f"{describe(r['metrics'])}" for r in shipped)))
    plots = [(n, t) for n, t in (("pareto_bytes", "Quality vs size"), ("pareto_speed", "Quality vs decode speed"),
                                 ("training_curves", "Training curves")) if n in images]
    if plots:
        sections.append(("Charts", "\n\n".join(f"![{t}]({n}.png)" for n, t in plots)))
    sections.append(("Stages", _md_table(["stage", "kind", "time", "cached", "metrics", "output"],
                                         stage_rows(records))))
    prov = {"recipe": recipe_source, "created": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "wall_seconds": round(wall_seconds, 1) if wall_seconds else None, "machine": machine or {}}
    sections.append(("Provenance", "```json\n" + json.dumps(prov, indent=2) + "\n```"))

    md = f"# {title}\n\n" + "\n\n".join(f"## {h}\n\n{b}" for h, b in sections) + "\n"
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html(title, sections, images))
    (out / "report.json").write_text(json.dumps({"title": title, "selection": selection, "stages": records,
                                                 "provenance": prov}, indent=2, default=str))
    return {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}


def _html(title: str, sections: list[tuple[str, str]], images: dict[str, bytes]) -> str:
    """The report as one HTML file: tables rendered from the markdown, images inlined."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(_md_to_html(body, images))
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_to_html(body: str, images: dict[str, bytes]) -> str:
    import re

    lines, out, i = body.splitlines(), [], 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
            continue
        if ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.match(r"^\|(-+\|)+$", lines[i]):
                    rows.append([c.strip() for c in lines[i].strip("|").split(" | ")])
                i += 1
            table = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr>"]
            table += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:]]
            out.append("\n".join(table) + "</table>")
            continue
        m = re.match(r"^!\[(.*)\]\((.*)\.png\)$", ln)
        if m and m.group(2) in images:
            data = base64.b64encode(images[m.group(2)]).decode()
            out.append(f"<p><img alt='{html.escape(m.group(1))}' src='data:image/png;base64,{data}'></p>")
        elif ln.startswith("- "):
            out.append(f"<li>{_inline(ln[2:])}</li>")
        elif ln.strip():
            out.append(f"<p>{_inline(ln)}</p>")
        i += 1
    return "\n".join(out)


def _inline(text: str) -> str:
    import re

    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
