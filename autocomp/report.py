"""Study reports: one self-contained HTML file (plotly, its JavaScript inlined: opens offline) or PNGs
(matplotlib) with the Pareto view, per-layer plan maps and the sensitivity chart. Reads only the study
(plans are stored in it), the sensitivity database file it names and the fidelity figures recorded in it
(:mod:`autocomp.fidelity`: predicted vs measured latency, predicted vs exported bytes, proxy vs true
metric); never loads the model."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError

__all__ = ["collect", "write_html", "write_pngs"]


def _plan_rows(plan: dict[str, Any], layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer: bits (32 = kept), sparsity, rank fraction, structured cut, bytes."""
    from autocomp.cost.size import layer_bytes, structured_shape
    from autocomp.desc import LayerDesc
    from autocomp.plan import Plan

    p = Plan.from_dict(plan)
    rows = []
    for d in layers:
        layer = LayerDesc(**d)
        c = p.layer(layer.name)
        r, k = structured_shape(layer, p.structured)
        fig = c.summary()
        rows.append({"layer": layer.name, "block": layer.block, "modality": layer.modality,
                     "bits": fig.get("bits", 8 * layer.weight_itemsize), "sparsity": fig.get("sparsity", 0.0),
                     "rank": fig["rank"] / min(layer.rows, layer.cols) if "rank" in fig else 1.0,
                     "cut": 1 - (r * k) / (layer.rows * layer.cols), "bytes": layer_bytes(layer, c, r, k)})
    return rows


def collect(handle: Any) -> dict[str, Any]:
    """Everything the report draws, as plain data."""
    import optuna

    from autocomp.search.study import front_trials, trial_metric
    from autocomp.search.pareto import feasible, knee_index

    S = optuna.trial.TrialState
    meta = handle.meta
    objectives = meta.get("objectives", ["proxy", "size"])
    model = meta["model"]
    trials = handle.study.get_trials(deepcopy=False)
    budget = handle.budget_bytes
    front = front_trials(handle.study, budget, objectives)
    front_ids = {t.number for t in front}
    points = []
    for t in trials:
        size = t.user_attrs.get("size_bytes")
        if t.state == S.COMPLETE and t.values:
            kind = "feasible" if feasible(t) and size is not None and size <= budget else "infeasible"
            proxy = trial_metric(t, "proxy", objectives)
        elif t.state == S.PRUNED and size is not None:
            kind, proxy = "infeasible", None  # over a budget: never evaluated
        elif t.state == S.FAIL and not t.user_attrs.get("autocomp_stale"):
            kind, proxy = "failed", None
        else:
            continue
        points.append({"trial": t.number, "kind": kind, "size": size, "proxy": proxy,
                       "latency_ms": t.user_attrs.get("latency_ms"), "front": t.number in front_ids,
                       "reference": t.user_attrs.get("reference"), "summary": t.user_attrs.get("plan_summary", "")})
    chosen: dict[str, Any] = {}
    if front:
        sizes = [trial_metric(t, "size", objectives) for t in front]
        proxies = [trial_metric(t, "proxy", objectives) for t in front]
        chosen = {"smallest": front[0], "best": front[min(range(len(front)), key=lambda i: (proxies[i], sizes[i]))],
                  "knee": front[knee_index(list(zip(sizes, proxies)))]}
    plans = {}
    for label, t in chosen.items():
        if "plan" in t.user_attrs:
            plans[label] = {"trial": t.number, "size": t.user_attrs.get("size_bytes"),
                            "proxy": trial_metric(t, "proxy", objectives),
                            "rows": _plan_rows(t.user_attrs["plan"], model["layers"])}
    sens = None
    path = meta.get("sensitivity_file")
    if path and Path(path).is_file():
        try:
            sens = json.loads(Path(path).read_text())["table"]
        except (OSError, ValueError, KeyError):
            sens = None
    from autocomp.fidelity import read

    return {"study": handle.name, "model": model["name"], "fp32_bytes": model["fp32_bytes"], "budget": budget,
            "objectives": objectives, "points": points, "plans": plans, "sensitivity": sens,
            "hardware": meta.get("hardware"), "fidelity": read(handle.study)}


def _fidelity_panels(fid: dict[str, Any]) -> list[dict[str, Any]]:
    """The fidelity panels as plain series: title, axis names, points (x, y, label), whether y = x is the
    ideal (a dashed diagonal), and a one-line summary."""
    panels = []
    for kind, where in (("latency", ""), ("latency_ort", "in ONNX Runtime ")):
        lat = fid.get(kind)
        if not (lat and lat.get("rows")):
            continue
        panels.append({"name": f"fidelity-{kind.replace('_', '-')}", "diagonal": True,
                       "xlabel": "predicted latency (ms)", "ylabel": "measured latency (ms)",
                       "title": f"latency {where}on {lat.get('hardware')}: Spearman {lat.get('spearman', 0):.3f}, MAPE "
                                f"{lat.get('mape', 0):.1%}, within ±10% {lat.get('within_10pct', 0):.0%}"
                                + (f", {lat['reference']['within_10pct_at_speed']:.0%} at the machine's speed then "
                                   f"(fp32 ran {lat['reference']['speed_factor']:.2f}x its predicted time)"
                                   if lat.get("reference") else "")
                                + f" ({len(lat['rows'])} plans, {lat.get('at', '')})",
                       "x": [r["predicted_ms"] for r in lat["rows"]], "y": [r["measured_ms"] for r in lat["rows"]],
                       "series": ["study front" if str(r.get("source", "random")).startswith("trial") else "random plans"
                                  for r in lat["rows"]],
                       "labels": [r.get("source", f"plan {i + 1}") for i, r in enumerate(lat["rows"])]})
    exp = fid.get("export")
    if exp:
        worst = max(abs(r["file_bytes"] - r["predicted_bytes"]) / max(1, r["predicted_bytes"]) for r in exp)
        exact = sum(r.get("payload_bytes") == r["predicted_bytes"] for r in exp)  # ONNX files have no payload figure
        names = [f"{Path(r['path']).name} (trial {r.get('trial')}, {r['predicted_bytes'] / 1e6:.3g} MB)" for r in exp]
        panels.append({"name": "fidelity-bytes", "bars": True, "xlabel": "export", "diagonal": False,
                       "ylabel": "bytes over the prediction (%)",
                       "title": f"exports: payload == prediction for {exact} of {len(exp)}; whole file within "
                                f"{worst:.2%} of the prediction (packed: the rest is the header; ONNX: float32 "
                                f"scales, kernel containers, dense sparsity)" if any("payload_bytes" not in r for r in exp)
                                else f"exports: payload == prediction for {exact} of {len(exp)}; whole file within "
                                f"{worst:.2%} of the prediction (the rest is the header: plan, spec, checksum)",
                       "x": names * 2,
                       "y": [100 * (r.get("payload_bytes", r["file_bytes"]) / r["predicted_bytes"] - 1) for r in exp] +
                            [100 * (r["file_bytes"] / r["predicted_bytes"] - 1) for r in exp],
                       "series": ["tensor payload" if "payload_bytes" in r else "ONNX file" for r in exp] +
                                 ["whole file"] * len(exp), "labels": names * 2})
    met = fid.get("metric")
    if met and met.get("rows"):
        rows = met["rows"]
        panels.append({"name": "fidelity-metric", "diagonal": False, "xlabel": "proxy (drift)",
                       "ylabel": f"true metric ({met.get('metric')})",
                       "title": f"proxy vs {met.get('metric')}: Spearman {met.get('spearman_proxy_vs_metric', 0):.3f} "
                                f"over {len(rows)} plans ({met.get('at', '')})",
                       "x": [r["proxy"] for r in rows], "y": [r["value"] for r in rows],
                       "series": ["study front" if str(r.get("source", "random")).startswith("trial") else "random plans"
                                  for r in rows],
                       "labels": [r.get("source", "random") for r in rows]})
    return panels


FIDELITY_HOWTO = {
    "fidelity-latency": "autocomp hardware validate --study {study}",
    "fidelity-latency-ort": "autocomp hardware validate --runtime ort --study {study}",
    "fidelity-bytes": "autocomp plan --study {study} --out plan.json && autocomp export --plan plan.json --out m.acz.safetensors",
    "fidelity-metric": "autocomp evaluate --study {study} --random-plans 30 --budget BUDGET",
}


def _pareto_figure(data: dict[str, Any]) -> Any:
    import plotly.graph_objects as go

    mb = 1e6
    pareto = go.Figure()
    styles = {"feasible": ("#4c78a8", 6), "infeasible": ("#bbbbbb", 5), "failed": ("#e45756", 7)}
    finite = [p["proxy"] for p in data["points"] if p["proxy"] is not None and p["proxy"] > 0]
    top = max(finite) * 2 if finite else 1.0
    for kind, (color, size) in styles.items():
        pts = [p for p in data["points"] if p["kind"] == kind and p["size"] is not None]
        if not pts:
            continue
        pareto.add_trace(go.Scatter(
            x=[p["size"] / mb for p in pts], y=[p["proxy"] if p["proxy"] is not None else top for p in pts],
            mode="markers", name=f"{kind} ({len(pts)})", marker={"color": color, "size": size},
            text=[f"trial {p['trial']}<br>{html.escape(p['summary'])}" for p in pts], hoverinfo="text+x+y"))
    front = sorted((p for p in data["points"] if p["front"]), key=lambda p: p["size"])
    if front:
        pareto.add_trace(go.Scatter(x=[p["size"] / mb for p in front], y=[p["proxy"] for p in front],
                                    mode="lines+markers", name="Pareto front", line={"color": "#f58518"},
                                    text=[f"trial {p['trial']}<br>{html.escape(p['summary'])}" for p in front],
                                    hoverinfo="text+x+y"))
    refs = [p for p in data["points"] if p["reference"] and p["proxy"] is not None]
    if refs:
        pareto.add_trace(go.Scatter(x=[p["size"] / mb for p in refs], y=[p["proxy"] for p in refs], mode="markers",
                                    name="seeded / uniform references", marker={"symbol": "diamond-open", "size": 10,
                                                                                 "color": "#54a24b"},
                                    text=[p["reference"] for p in refs], hoverinfo="text+x+y"))
    pareto.add_vline(x=data["budget"] / mb, line_dash="dash", annotation_text="budget")
    pareto.update_layout(title=f"{data['study']}: proxy vs size ({len(data['points'])} trials; failed and "
                               "unevaluated trials drawn at the top)", xaxis_title="size (MB)",
                         yaxis_title="proxy (drift)", yaxis_type="log" if finite else "linear")
    return pareto


def _figures(data: dict[str, Any]) -> list[tuple[str, Any]]:
    import plotly.graph_objects as go

    figs = [("pareto", _pareto_figure(data))]
    mb = 1e6
    lat = [p for p in data["points"] if p["latency_ms"] is not None and p["proxy"] is not None]
    if lat:
        f3 = go.Figure(go.Scatter3d(x=[p["size"] / mb for p in lat], y=[p["latency_ms"] for p in lat],
                                    z=[p["proxy"] for p in lat], mode="markers",
                                    marker={"size": 3, "color": ["#f58518" if p["front"] else "#4c78a8" for p in lat]},
                                    text=[p["summary"] for p in lat]))
        f3.update_layout(title="proxy, size and latency", scene={"xaxis_title": "size (MB)",
                                                                 "yaxis_title": "latency (ms)", "zaxis_title": "proxy"})
        figs.append(("pareto3d", f3))
    for label, plan in data["plans"].items():
        rows = plan["rows"]
        names = [f"{r['modality']}:{r['layer']}" for r in rows]
        z = [[r["bits"] for r in rows], [100 * r["sparsity"] for r in rows], [100 * (1 - r["rank"]) for r in rows],
             [100 * r["cut"] for r in rows]]
        fig = go.Figure(go.Heatmap(z=z, x=names, y=["bits", "sparsity %", "rank cut %", "structured cut %"],
                                   colorscale="Viridis", hovertemplate="%{x}<br>%{y}: %{z}<extra></extra>"))
        fig.update_layout(title=f"plan map: {label} (trial {plan['trial']}, {plan['size'] / mb:.2f} MB, proxy "
                                f"{plan['proxy']:.4g})", xaxis={"showticklabels": len(rows) <= 80}, height=320)
        figs.append((f"plan-{label}", fig))
    if data["sensitivity"]:
        fig = go.Figure()
        table = data["sensitivity"]
        opts = sorted({o for row in table.values() for o in row})
        for o in opts:
            ys = [table[p].get(o) for p in table]
            if any(y for y in ys if y):
                fig.add_trace(go.Bar(x=list(table), y=[max(y or 0.0, 1e-12) for y in ys], name=o))
        fig.update_layout(title="sensitivity database: proxy increase per option (everything else uncompressed)",
                          barmode="group", yaxis_type="log", height=420)
        figs.append(("sensitivity", fig))
    for panel in _fidelity_panels(data.get("fidelity") or {}):
        fig = go.Figure()
        series = panel.get("series") or [""] * len(panel["x"])
        for name in dict.fromkeys(series):
            idx = [i for i, s in enumerate(series) if s == name]
            if panel.get("bars"):
                fig.add_trace(go.Bar(x=[panel["x"][i] for i in idx], y=[panel["y"][i] for i in idx], name=name))
            else:
                fig.add_trace(go.Scatter(x=[panel["x"][i] for i in idx], y=[panel["y"][i] for i in idx],
                                         mode="markers", name=name or "plans", text=[panel["labels"][i] for i in idx],
                                         hoverinfo="text+x+y"))
        if panel["diagonal"] and panel["x"]:
            lo, hi = min(panel["x"] + panel["y"]), max(panel["x"] + panel["y"])
            fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="prediction = measurement",
                                     line={"dash": "dash", "color": "#888"}))
        fig.update_layout(title=panel["title"], xaxis_title=panel["xlabel"], yaxis_title=panel["ylabel"], height=420)
        figs.append((panel["name"], fig))
    return figs


def write_html(data: dict[str, Any], out: Path) -> Path:
    import plotly.io as pio

    from autocomp.plan import atomic_write_text

    parts = []
    if not data["points"]:
        parts.append("<p class='empty'>This study has no finished trials yet: run <code>autocomp search</code> on it."
                     "</p>")
    else:
        first = True
        for name, fig in _figures(data):
            parts.append(f"<section id='{name}'>" + pio.to_html(fig, full_html=False, include_plotlyjs=first,
                                                                 div_id=f"fig-{name}") + "</section>")
            first = False
        missing = [FIDELITY_HOWTO[k].format(study=html.escape(data["study"])) for k in FIDELITY_HOWTO
                   if k not in {p["name"] for p in _fidelity_panels(data.get("fidelity") or {})}]
        if missing:
            parts.append("<p class='fidelity-missing'>Fidelity panels not drawn yet (no figures recorded in this "
                         "study); make them with: " + "; ".join(f"<code>{m}</code>" for m in missing) + "</p>")
        for label, plan in data["plans"].items():
            rows = "".join(f"<tr><td>{html.escape(r['layer'])}</td><td>{r['modality']}</td><td>{r['bits']}</td>"
                           f"<td>{r['sparsity']:.0%}</td><td>{r['rank']:.2f}</td><td>{r['cut']:.0%}</td>"
                           f"<td>{r['bytes']:,}</td></tr>" for r in plan["rows"])
            parts.append(f"<details><summary>plan table: {label} (trial {plan['trial']})</summary><table>"
                         "<tr><th>layer</th><th>modality</th><th>bits</th><th>sparsity</th><th>rank</th>"
                         f"<th>cut</th><th>bytes</th></tr>{rows}</table></details>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>autocomp report: "
            f"{html.escape(data['study'])}</title><style>body{{font-family:sans-serif;margin:1em 2em}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style>"
            "<script>window.__errors=[];window.addEventListener('error',e=>{window.__errors.push(String(e.message));"
            "document.documentElement.setAttribute('data-errors',window.__errors.length)});</script></head><body>"
            f"<h1>{html.escape(data['study'])}</h1><p>model {html.escape(data['model'])}, fp32 "
            f"{data['fp32_bytes'] / 1e6:.2f} MB, budget {data['budget'] / 1e6:.2f} MB, objectives "
            f"{', '.join(data['objectives'])}; {len(data['points'])} trials.</p>" + "".join(parts) +
            "</body></html>")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, page)
    except OSError as e:
        raise AutocompError(f"cannot write the report to {str(out)!r}: {e.strerror}; choose another --out") from None
    return out


def write_pngs(data: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AutocompError(f"cannot write PNGs to {str(out_dir)!r}: {e.strerror}; choose another --out") from None
    written = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{name}.png"
        tmp = path.with_name(path.name + ".tmp.png")
        try:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
            tmp.replace(path)
        except OSError as e:
            raise AutocompError(f"cannot write {str(path)!r}: {e.strerror}; choose another --out") from None
        finally:
            plt.close(fig)
        written.append(path)

    save(_png_pareto(plt, data), "pareto")
    for label, plan in data["plans"].items():
        save(_png_plan(plt, label, plan), f"plan-{label}")
    if data["sensitivity"]:
        save(_png_sensitivity(plt, data["sensitivity"]), "sensitivity")
    for panel in _fidelity_panels(data.get("fidelity") or {}):
        save(_png_panel(plt, panel), panel["name"])
    return written


def _png_pareto(plt: Any, data: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not data["points"]:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    finite = [p["proxy"] for p in data["points"] if p["proxy"] is not None and p["proxy"] > 0]
    top = max(finite) * 2 if finite else 1.0
    for kind, color in (("infeasible", "#bbbbbb"), ("feasible", "#4c78a8"), ("failed", "#e45756")):
        pts = [p for p in data["points"] if p["kind"] == kind and p["size"] is not None]
        if pts:
            ax.scatter([p["size"] / 1e6 for p in pts], [p["proxy"] if p["proxy"] is not None else top for p in pts],
                       s=10, c=color, label=f"{kind} ({len(pts)})")
    front = sorted((p for p in data["points"] if p["front"]), key=lambda p: p["size"])
    ax.plot([p["size"] / 1e6 for p in front], [p["proxy"] for p in front], "-o", c="#f58518", ms=4, label="front")
    ax.axvline(data["budget"] / 1e6, ls="--", c="k", lw=1, label="budget")
    if finite:
        ax.set_yscale("log")
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("proxy (drift)")
    ax.legend(fontsize=8)
    ax.set_title(data["study"])
    return fig


def _png_plan(plt: Any, label: str, plan: dict[str, Any]) -> Any:
    rows = plan["rows"]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.12), 2.6))
    z = [[r["bits"] for r in rows], [100 * r["sparsity"] for r in rows], [100 * (1 - r["rank"]) for r in rows],
         [100 * r["cut"] for r in rows]]
    ax.imshow([[v / max(1e-9, max(row)) for v in row] for row in z], aspect="auto", cmap="viridis")
    ax.set_yticks(range(4), ["bits", "sparsity", "rank cut", "structured cut"])
    ax.set_xlabel("layer")
    ax.set_title(f"plan map: {label} (trial {plan['trial']})")
    return fig


def _png_sensitivity(plt: Any, table: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(max(6, len(table) * 0.1), 3.5))
    for o in sorted({o for row in table.values() for o in row}):
        ys = [max(table[p].get(o) or 0.0, 1e-12) for p in table]
        if max(ys) > 1e-12 and all(math.isfinite(y) for y in ys):
            ax.plot(range(len(ys)), ys, ".", ms=3, label=o)
    ax.set_yscale("log")
    ax.set_xlabel("choice")
    ax.set_ylabel("proxy increase")
    ax.legend(fontsize=6, ncol=4)
    return fig


def _png_panel(plt: Any, panel: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    series = panel.get("series") or [""] * len(panel["x"])
    for name in dict.fromkeys(series):
        idx = [i for i, s in enumerate(series) if s == name]
        if panel.get("bars"):
            k = list(dict.fromkeys(series)).index(name)
            pos = [j + 0.4 * k for j in range(len(idx))]
            ax.bar(pos, [panel["y"][i] for i in idx], width=0.4, label=name)
            ax.set_xticks([j + 0.2 for j in range(len(idx))], [panel["x"][i] for i in idx], rotation=20,
                          ha="right", fontsize=6)
        else:
            ax.scatter([panel["x"][i] for i in idx], [panel["y"][i] for i in idx], s=14, label=name or "plans")
    if panel["diagonal"] and panel["x"]:
        lo, hi = min(panel["x"] + panel["y"]), max(panel["x"] + panel["y"])
        ax.plot([lo, hi], [lo, hi], "--", c="#888", lw=1, label="prediction = measurement")
    ax.set_xlabel(panel["xlabel"])
    ax.set_ylabel(panel["ylabel"])
    ax.set_title(panel["title"], fontsize=8)
    ax.legend(fontsize=7)
    return fig
