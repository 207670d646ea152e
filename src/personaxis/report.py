"""Figures of the persona space and a self-contained HTML report (PNG images inlined, no network)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from personaxis.io.run_layout import REPORT_FIGURES, RunLayout
from personaxis.store import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from personaxis.space import LayerSpace


def _figure(width: float = 7, height: float = 4.5) -> Figure:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def pca_scatter(summary: dict[str, Any], space: LayerSpace) -> Figure:
    roles = summary["roles"]
    coords = np.array([r["pc"] + [0.0] * (3 - len(r["pc"])) for r in roles])
    proj = np.array([r["projection"] for r in roles])
    fig = _figure(11, 4.8)
    axes = fig.subplots(1, 2)
    for ax, (i, j) in zip(axes, [(0, 1), (0, 2)], strict=True):
        points = ax.scatter(coords[:, i], coords[:, j], c=proj, cmap="coolwarm", s=28, edgecolors="k", linewidths=0.3)
        ax.scatter(
            [space.default_coords[i]],
            [space.default_coords[j] if j < len(space.default_coords) else 0],
            marker="*",
            s=220,
            c="gold",
            edgecolors="k",
            label="default (Assistant)",
        )
        for k, role in enumerate(roles):
            ax.annotate(
                role["name"],
                (coords[k, i], coords[k, j]),
                fontsize=6,
                alpha=0.75,
                xytext=(2, 2),
                textcoords="offset points",
            )
        ax.set_xlabel(f"PC{i + 1}")
        ax.set_ylabel(f"PC{j + 1}")
        ax.legend(loc="best", fontsize=7)
    fig.colorbar(points, ax=axes, label="projection on the Assistant Axis")
    fig.suptitle(f"Persona space at layer {summary['target_layer']} ({summary['model']})")
    return fig


def variance_plot(summary: dict[str, Any]) -> Figure:
    layer = summary["layers"][summary["target_layer"]]
    ratios = np.array(layer["explained_variance"])
    fig = _figure()
    ax = fig.subplots()
    ax.bar(np.arange(1, len(ratios) + 1), ratios, color="steelblue", label="per component")
    ax.plot(np.arange(1, len(ratios) + 1), np.cumsum(ratios), "o-", color="darkorange", label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("fraction of variance")
    ax.set_ylim(0, 1)
    ax.set_title(f"Variance explained at layer {summary['target_layer']}")
    ax.legend()
    return fig


def cosine_plot(summary: dict[str, Any]) -> Figure:
    layers = summary["layers"]
    fig = _figure()
    ax = fig.subplots()
    ax.plot([x["layer"] for x in layers], [x["cos_pc1_axis"] for x in layers], "o-", label="cos(PC1, axis)")
    ax.plot(
        [x["layer"] for x in layers],
        [x["pc1_explained_variance"] for x in layers],
        "s--",
        label="PC1 explained variance",
    )
    ax.axvline(summary["target_layer"], color="grey", ls=":", label="target layer")
    ax.set_xlabel("layer (output of decoder block)")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("PC1 against the Assistant Axis, per layer")
    return fig


def extremes_plot(summary: dict[str, Any], n: int = 10) -> Figure:
    roles = sorted(summary["roles"], key=lambda r: r["projection"])
    picked = roles[:n] + roles[-n:] if len(roles) > 2 * n else roles
    fig = _figure(7, max(3.0, 0.22 * len(picked) + 1))
    ax = fig.subplots()
    values = [r["projection"] for r in picked]
    colors = ["indianred" if v < np.median(values) else "steelblue" for v in values]
    ax.barh([r["name"] for r in picked], values, color=colors)
    ax.axvline(summary["default_projection"], color="gold", lw=3, label="default (Assistant)")
    ax.set_xlabel(f"projection on the axis at layer {summary['target_layer']}")
    ax.set_title("Roles at either end of the Assistant Axis")
    ax.legend(loc="lower right")
    return fig


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _traits_section(traits: dict[str, Any] | None) -> str:
    """The traits ranked along the axis (from ``summary["trait_space"]``), or nothing."""
    if not traits:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(t['name'])}</td><td>{t['cos_axis']:.3f}</td><td>{t['projection']:.3f}</td>"
        f"<td>{t.get('n_pairs_kept', t.get('n_pairs', ''))}</td></tr>"
        for t in traits["traits"]
    )
    pca = traits.get("pca") or {}
    pca_line = (
        (
            f"<p>Trait PCA: PC1 explains {pca['explained_variance'][0]:.1%} of the trait variance; "
            f"cos(trait PC1, axis) = {pca['cos_pc1_axis']:.3f}.</p>"
        )
        if pca
        else ""
    )
    return f"""<h2>Traits along the axis (layer {traits["layer"]})</h2>
<p>At the Assistant end: {html.escape(", ".join(traits["assistant_end"]) or "—")}. At the far end:
{html.escape(", ".join(traits["far_end"]) or "—")}.</p>{pca_line}
<table><tr><th>trait</th><th>cos(trait, axis)</th><th>projection</th><th>pairs</th></tr>{rows}</table>"""


def write_report(layout: RunLayout, summary: dict[str, Any], space: LayerSpace) -> Path:
    """The run's ``report.html`` and its figures."""
    figures = (pca_scatter(summary, space), variance_plot(summary), cosine_plot(summary), extremes_plot(summary))
    pngs = []
    for name, fig in zip(REPORT_FIGURES, figures, strict=True):  # the layout's figure names, in this order
        pngs.append(figure_png(fig))
        atomic_write_bytes(layout.figure(name), pngs[-1])
    scatter, variance, cosine, extremes = pngs
    target = summary["target"]
    pos = summary["default_position"]
    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['category'])}</td><td>{r['n_rollouts']}</td>"
        f"<td>{html.escape(str(r['judge_counts']))}</td><td>{html.escape(r.get('group', r['vector_source']))}</td>"
        f"<td>{r['projection']:.3f}</td></tr>"
        for r in sorted(summary["roles"], key=lambda r: -r["projection"])
    )
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>personaxis report — {html.escape(summary["model"])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}img{{max-width:100%}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>Persona space of {html.escape(summary["model"])}</h1>
<p>{summary["n_layers"]} layers, target layer {summary["target_layer"]}; {summary.get("n_roles_kept", len(summary["roles"]))} roles kept,
{summary.get("n_roles_dropped", 0)} dropped (fewer than {summary.get("min_count", "?")} rollouts judged as role play),
{summary.get("n_roles_fell_back", 0)} fell back to pooled score-2 and score-3 rollouts; role vector recipe
<b>{html.escape(str(summary.get("vector_recipe", "pooled")))}</b>, {summary.get("n_space_vectors", len(summary["roles"]))} points in the persona space.</p>
<ul><li>cos(PC1, axis) at the target layer: <b>{target["cos_pc1_axis"]:.3f}</b> (lowest over layers {target["min_cos_pc1_axis"]:.3f})</li>
<li>PC1 explains {target["pc1_explained_variance"]:.1%} of the role variance at the target layer</li>
<li>Default position along PC1 within the role range: {pos["pc1_fraction"]:.3f}; along the axis: {pos["axis_fraction"]:.3f}
(1 = the Assistant end of the range)</li></ul>
{_img(scatter, "PC1-PC2-PC3 scatter")}
{_img(extremes, "roles at either end")}
{_img(cosine, "cosine per layer")}
{_img(variance, "variance explained")}
{_traits_section(summary.get("trait_space"))}
<h2>Roles</h2><table><tr><th>role</th><th>category</th><th>rollouts</th><th>judge counts</th><th>vector</th><th>projection</th></tr>{rows}</table>
</body></html>"""
    path = layout.report
    atomic_write_bytes(path, body.encode("utf-8"))
    return path
