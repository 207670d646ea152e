/* personaxis — small SVG charts written for these pages: line chart, bar chart, 2-D/3-D scatter. No dependencies. */
"use strict";

(function () {
  const { svg, el } = PX;

  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const frac = raw / power;
    return (frac <= 1 ? 1 : frac <= 2 ? 2 : frac <= 5 ? 5 : 10) * power;
  }

  function ticks(lo, hi, count, integer) {
    if (!(hi > lo)) return [lo];
    let step = niceStep(hi - lo, count);
    if (integer) step = Math.max(1, Math.round(step));
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return out;
  }

  function extent(values, pad = 0.08) {
    const finite = values.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
    if (!finite.length) return [0, 1];
    let lo = Math.min(...finite), hi = Math.max(...finite);
    if (lo === hi) { lo -= 1; hi += 1; }
    const margin = (hi - lo) * pad;
    return [lo - margin, hi + margin];
  }

  function tickLabel(v) {
    const a = Math.abs(v);
    if (a >= 1000 || (a > 0 && a < 0.01)) return v.toExponential(1);
    return Number.isInteger(v) ? String(v) : v.toFixed(a < 1 ? 2 : 1);
  }

  class Tooltip {
    constructor(container) {
      this.node = el("div", { class: "tooltip" });
      container.append(this.node);
      this.container = container;
    }
    show(event, html) {
      this.node.innerHTML = html;
      this.node.style.display = "block";
      const box = this.container.getBoundingClientRect();
      let x = event.clientX - box.left + 14, y = event.clientY - box.top + 12;
      const w = this.node.offsetWidth;
      if (x + w > box.width) x = Math.max(0, event.clientX - box.left - w - 14);
      this.node.style.left = `${x}px`;
      this.node.style.top = `${y}px`;
    }
    hide() { this.node.style.display = "none"; }
  }
  PX.escape = (text) => String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  function marker(shape, x, y, r, attrs) {
    if (shape === "diamond") {
      const d = r * 1.35;
      return svg("path", { d: `M${x},${y - d}L${x + d},${y}L${x},${y + d}L${x - d},${y}Z`, ...attrs });
    }
    if (shape === "square") return svg("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, ...attrs });
    return svg("circle", { cx: x, cy: y, r, ...attrs });
  }

  /* A line chart: series of points (x, y), horizontal reference lines and an optional pending point. */
  class LineChart {
    constructor(container, options = {}) {
      this.container = container;
      this.o = { width: 640, height: 320, margin: { top: 18, right: 118, bottom: 38, left: 54 }, xLabel: "", yLabel: "",
        xInteger: true, minX: null, emptyText: "", ...options };
      container.classList.add("chart");
      this.root = svg("svg", { viewBox: `0 0 ${this.o.width} ${this.o.height}`, role: "img" });
      container.append(this.root);
      this.tooltip = new Tooltip(container);
      this.data = { series: [], hlines: [], pending: null };
      this.render();
    }
    update(data) { this.data = { series: [], hlines: [], pending: null, ...data }; this.render(); }
    render() {
      const { width, height, margin: m } = this.o;
      const root = this.root;
      root.replaceChildren();
      const series = this.data.series || [];
      const hlines = (this.data.hlines || []).filter((h) => Number.isFinite(h.y));
      const pending = this.data.pending;
      const points = series.flatMap((s) => s.points.filter((p) => Number.isFinite(p.y)));
      const xs = points.map((p) => p.x).concat(pending ? [pending.x] : []);
      const ys = points.map((p) => p.y).concat(hlines.map((h) => h.y)).concat(pending && Number.isFinite(pending.y) ? [pending.y] : []);
      let [x0, x1] = xs.length ? [Math.min(...xs), Math.max(...xs)] : [1, 3];
      if (this.o.minX !== null) x0 = Math.min(x0, this.o.minX);
      if (x1 - x0 < 2) x1 = x0 + 2;
      x0 -= 0.35; x1 += 0.35;
      const [y0, y1] = extent(ys, 0.12);
      const W = width - m.left - m.right, H = height - m.top - m.bottom;
      const sx = (x) => m.left + ((x - x0) / (x1 - x0)) * W;
      const sy = (y) => m.top + (1 - (y - y0) / (y1 - y0)) * H;
      this.scale = { sx, sy };
      const grid = svg("g", { class: "grid" }), axis = svg("g", { class: "axis" });
      for (const t of ticks(y0, y1, 5)) {
        grid.append(svg("line", { x1: m.left, x2: m.left + W, y1: sy(t), y2: sy(t) }));
        axis.append(svg("text", { x: m.left - 6, y: sy(t) + 4, "text-anchor": "end", text: tickLabel(t) }));
      }
      for (const t of ticks(Math.ceil(x0), Math.floor(x1), 10, this.o.xInteger)) {
        axis.append(svg("line", { x1: sx(t), x2: sx(t), y1: m.top + H, y2: m.top + H + 4 }));
        axis.append(svg("text", { x: sx(t), y: m.top + H + 16, "text-anchor": "middle", text: tickLabel(t) }));
      }
      axis.append(svg("line", { x1: m.left, x2: m.left + W, y1: m.top + H, y2: m.top + H }));
      axis.append(svg("line", { x1: m.left, x2: m.left, y1: m.top, y2: m.top + H }));
      axis.append(svg("text", { class: "title", x: m.left + W / 2, y: height - 4, "text-anchor": "middle", text: this.o.xLabel }));
      axis.append(svg("text", { class: "title", x: 12, y: m.top + H / 2, "text-anchor": "middle",
        transform: `rotate(-90 12 ${m.top + H / 2})`, text: this.o.yLabel }));
      root.append(grid, axis);
      const refs = svg("g", { class: "refs" });
      for (const h of hlines) {
        refs.append(svg("line", { class: h.cls || "hline", x1: m.left, x2: m.left + W, y1: sy(h.y), y2: sy(h.y), stroke: h.color || "#999",
          "stroke-width": h.width || 1.5, "stroke-dasharray": h.dash || "6 4" }));
        refs.append(svg("text", { x: m.left + W + 6, y: sy(h.y) + 4, fill: h.color || "#999", text: h.label || "" }));
      }
      root.append(refs);
      const tip = this.tooltip;
      for (const s of series) {
        const pts = s.points.filter((p) => Number.isFinite(p.y));
        const g = svg("g", { class: `series ${s.cls || ""}`, "data-series": s.id || s.name });
        if (pts.length > 1) {
          g.append(svg("path", { d: pts.map((p, i) => `${i ? "L" : "M"}${sx(p.x)},${sy(p.y)}`).join(""), fill: "none",
            stroke: s.color, "stroke-width": s.width || 2, "stroke-dasharray": s.dashed ? "7 5" : null, opacity: s.opacity || 1 }));
        }
        for (const p of pts) {
          const node = marker(p.marker || s.marker || "circle", sx(p.x), sy(p.y), p.r || s.r || 5, {
            class: `point ${p.cls || ""}`, fill: p.color || s.color, stroke: "#fff", "stroke-width": 1.5,
            "data-series": s.id || s.name, "data-x": p.x, "data-y": p.y.toFixed(4), ...(p.attrs || {}),
          });
          if (p.tip) {
            node.addEventListener("mousemove", (e) => tip.show(e, p.tip));
            node.addEventListener("mouseleave", () => tip.hide());
          }
          g.append(node);
        }
        root.append(g);
      }
      if (pending && Number.isFinite(pending.y)) {
        root.append(svg("circle", { class: "pending", cx: sx(pending.x), cy: sy(pending.y), r: 6, fill: "none",
          stroke: pending.color || "#2f6fde", "stroke-width": 2, "stroke-dasharray": "3 2" }));
        root.append(svg("text", { x: sx(pending.x) + 9, y: sy(pending.y) + 4, fill: pending.color || "#2f6fde", text: pending.label || "" }));
      }
      if (!points.length && !pending && this.o.emptyText) {
        root.append(svg("text", { x: m.left + W / 2, y: m.top + H / 2, "text-anchor": "middle", fill: "#98a2b3", text: this.o.emptyText }));
      }
    }
  }

  /* Vertical bars with labels under them. */
  class BarChart {
    constructor(container, options = {}) {
      this.o = { width: 520, height: 240, margin: { top: 16, right: 12, bottom: 36, left: 48 }, yLabel: "", xLabel: "",
        color: "#2f6fde", percent: true, ...options };
      container.classList.add("chart");
      this.root = svg("svg", { viewBox: `0 0 ${this.o.width} ${this.o.height}`, role: "img" });
      container.append(this.root);
      this.tooltip = new Tooltip(container);
    }
    update(bars) {
      const { width, height, margin: m } = this.o;
      const root = this.root;
      root.replaceChildren();
      const W = width - m.left - m.right, H = height - m.top - m.bottom;
      const top = Math.max(1e-9, ...bars.map((b) => b.value)) * 1.1;
      const sy = (v) => m.top + (1 - v / top) * H;
      const axis = svg("g", { class: "axis" }), grid = svg("g", { class: "grid" });
      for (const t of ticks(0, top, 4)) {
        grid.append(svg("line", { x1: m.left, x2: m.left + W, y1: sy(t), y2: sy(t) }));
        axis.append(svg("text", { x: m.left - 6, y: sy(t) + 4, "text-anchor": "end", text: this.o.percent ? `${Math.round(t * 100)}%` : tickLabel(t) }));
      }
      axis.append(svg("line", { x1: m.left, x2: m.left + W, y1: m.top + H, y2: m.top + H }));
      axis.append(svg("text", { class: "title", x: m.left + W / 2, y: height - 3, "text-anchor": "middle", text: this.o.xLabel }));
      axis.append(svg("text", { class: "title", x: 12, y: m.top + H / 2, "text-anchor": "middle",
        transform: `rotate(-90 12 ${m.top + H / 2})`, text: this.o.yLabel }));
      root.append(grid, axis);
      const slot = W / Math.max(1, bars.length);
      bars.forEach((b, i) => {
        const x = m.left + i * slot + slot * 0.15, w = slot * 0.7;
        const rect = svg("rect", { class: "bar", x, y: sy(b.value), width: w, height: m.top + H - sy(b.value), rx: 2, fill: b.color || this.o.color });
        rect.addEventListener("mousemove", (e) => this.tooltip.show(e, b.tip || `${b.label}: ${(b.value * 100).toFixed(1)}%`));
        rect.addEventListener("mouseleave", () => this.tooltip.hide());
        root.append(rect, svg("text", { x: x + w / 2, y: m.top + H + 14, "text-anchor": "middle", text: b.label }));
      });
    }
  }

  /* Points in three dimensions: a rotatable 3-D view (drag) or one of the 2-D planes. */
  class Scatter {
    constructor(container, options = {}) {
      this.o = { width: 640, height: 500, labels: ["PC1", "PC2", "PC3"], ...options };
      container.classList.add("chart", "scatter");
      this.root = svg("svg", { viewBox: `0 0 ${this.o.width} ${this.o.height}`, role: "img" });
      container.append(this.root);
      this.tooltip = new Tooltip(container);
      this.points = [];
      this.view = "3d";
      this.yaw = -0.65; this.pitch = 0.35;
      this.highlight = null; this.selected = null; this.onClick = null; this.vline = null;
      this._drag();
    }
    setData(points) { this.points = points; this.render(); }
    setView(view) { this.view = view; this.render(); }
    setHighlight(ids) { this.highlight = ids; this.render(); }
    setSelected(id) { this.selected = id; this.render(); }
    _drag() {
      let last = null;
      this.root.addEventListener("pointerdown", (e) => {
        if (this.view !== "3d") return;
        last = [e.clientX, e.clientY];
        this.root.classList.add("dragging");
        this.root.setPointerCapture(e.pointerId);
      });
      this.root.addEventListener("pointermove", (e) => {
        if (!last) return;
        this.yaw += (e.clientX - last[0]) * 0.01;
        this.pitch = Math.max(-1.5, Math.min(1.5, this.pitch + (e.clientY - last[1]) * 0.01));
        last = [e.clientX, e.clientY];
        this.render();
      });
      const end = () => { last = null; this.root.classList.remove("dragging"); };
      this.root.addEventListener("pointerup", end);
      this.root.addEventListener("pointercancel", end);
    }
    _project() {
      const { width, height } = this.o;
      const span = [0, 1, 2].map((k) => Math.max(1e-9, ...this.points.map((p) => Math.abs(p.coords[k] || 0))));
      if (this.view === "3d") {
        const s = Math.max(...span);
        const cy = Math.cos(this.yaw), sy = Math.sin(this.yaw), cp = Math.cos(this.pitch), sp = Math.sin(this.pitch);
        const R = Math.min(width, height) * 0.42;
        const proj = (v) => {
          const [a, b, c] = v.map((x) => x / s);
          const x1 = a * cy - c * sy, z1 = a * sy + c * cy;
          const y2 = b * cp - z1 * sp, z2 = b * sp + z1 * cp;
          return { x: width / 2 + x1 * R, y: height / 2 - y2 * R, depth: z2 };
        };
        return { proj, s };
      }
      const [i, j] = { "12": [0, 1], "13": [0, 2], "23": [1, 2] }[this.view];
      const m = { left: 54, right: 18, top: 16, bottom: 40 };
      const W = width - m.left - m.right, H = height - m.top - m.bottom;
      const xr = span[i] * 1.12, yr = span[j] * 1.12;
      const sx = (v) => m.left + ((v + xr) / (2 * xr)) * W, syy = (v) => m.top + (1 - (v + yr) / (2 * yr)) * H;
      return { proj: (v) => ({ x: sx(v[i] || 0), y: syy(v[j] || 0), depth: 0 }), i, j, xr, yr, sx, sy: syy, m, W, H };
    }
    render() {
      const root = this.root, { labels } = this.o;
      root.replaceChildren();
      if (!this.points.length) return;
      const P = this._project();
      const axes = svg("g", { class: "axis" });
      if (this.view === "3d") {
        const s = P.s;
        [[s, 0, 0], [0, s, 0], [0, 0, s]].forEach((v, k) => {
          const a = P.proj(v.map((x) => -x)), b = P.proj(v);
          axes.append(svg("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: "#b5bdcc", "stroke-dasharray": "4 4" }));
          axes.append(svg("text", { class: "title", x: b.x + 4, y: b.y - 4, text: labels[k] }));
        });
        axes.append(svg("text", { x: 8, y: this.o.height - 8, text: "drag to rotate" }));
      } else {
        const { i, j, xr, yr, sx, sy, m, W, H } = P;
        const grid = svg("g", { class: "grid" });
        for (const t of ticks(-xr, xr, 6)) {
          grid.append(svg("line", { x1: sx(t), x2: sx(t), y1: m.top, y2: m.top + H }));
          axes.append(svg("text", { x: sx(t), y: m.top + H + 15, "text-anchor": "middle", text: tickLabel(t) }));
        }
        for (const t of ticks(-yr, yr, 6)) {
          grid.append(svg("line", { x1: m.left, x2: m.left + W, y1: sy(t), y2: sy(t) }));
          axes.append(svg("text", { x: m.left - 6, y: sy(t) + 4, "text-anchor": "end", text: tickLabel(t) }));
        }
        root.append(grid);
        axes.append(svg("line", { x1: sx(0), x2: sx(0), y1: m.top, y2: m.top + H, stroke: "#c9d0dc" }));
        axes.append(svg("line", { x1: m.left, x2: m.left + W, y1: sy(0), y2: sy(0), stroke: "#c9d0dc" }));
        axes.append(svg("text", { class: "title", x: m.left + W / 2, y: this.o.height - 6, "text-anchor": "middle", text: labels[i] }));
        axes.append(svg("text", { class: "title", x: 12, y: m.top + H / 2, "text-anchor": "middle",
          transform: `rotate(-90 12 ${m.top + H / 2})`, text: labels[j] }));
        if (this.vline && i === 0 && Number.isFinite(this.vline.x)) {
          axes.append(svg("line", { x1: sx(this.vline.x), x2: sx(this.vline.x), y1: m.top, y2: m.top + H, stroke: "#2e9b5f",
            "stroke-width": 1.5, "stroke-dasharray": "6 4" }));
          axes.append(svg("text", { x: sx(this.vline.x) + 4, y: m.top + 12, fill: "#2e9b5f", text: this.vline.label }));
        }
      }
      root.append(axes);
      const placed = this.points.map((p) => ({ p, ...P.proj(p.coords) })).sort((a, b) => a.depth - b.depth);
      const tip = this.tooltip;
      const g = svg("g", { class: "points" });
      const labelAll = this.view !== "3d" && this.points.length <= 40;
      for (const { p, x, y, depth } of placed) {
        const dim = this.highlight && !this.highlight.has(p.id);
        const chosen = this.selected === p.id;
        const r = (this.view === "3d" ? 6 + depth * 1.6 : 6) * (chosen ? 1.35 : 1);
        const node = svg("circle", { class: `role-point${chosen ? " selected" : ""}${dim ? " dim" : ""}`, cx: x, cy: y, r: Math.max(2.5, r),
          fill: p.color, "fill-opacity": dim ? 0.15 : 0.9, stroke: chosen ? "#151a26" : "#fff", "stroke-width": chosen ? 2.5 : 1.2,
          "data-role": p.id, style: "cursor:pointer" });
        node.addEventListener("mousemove", (e) => tip.show(e, p.tip));
        node.addEventListener("mouseleave", () => tip.hide());
        node.addEventListener("click", () => this.onClick && this.onClick(p.id));
        g.append(node);
        if ((chosen || (this.highlight && !dim && this.highlight.size <= 12)) && p.name) {
          g.append(svg("text", { x: x + 9, y: y + 4, class: "title", text: p.name }));
        } else if (labelAll && !dim && p.name) {
          g.append(svg("text", { x: x + 8, y: y + 4, class: "point-label", text: p.name }));
        }
      }
      root.append(g);
    }
  }

  PX.LineChart = LineChart;
  PX.BarChart = BarChart;
  PX.Scatter = Scatter;
})();
