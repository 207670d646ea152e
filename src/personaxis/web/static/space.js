/* personaxis — persona-space page: roles in PC1–PC3, search, role details, variance and cosines per layer. */
"use strict";

(function () {
  const { el, fmt } = PX;
  const $ = (id) => document.getElementById(id);
  const state = { space: null, roles: [], colors: {}, selected: null, query: "" };
  let scatter, variance, cosines;

  function colorOf(category) {
    if (!(category in state.colors)) {
      state.colors[category] = PX.CATEGORY_COLORS[Object.keys(state.colors).length % PX.CATEGORY_COLORS.length];
    }
    return state.colors[category];
  }

  function stat(value, key) {
    return el("div", { class: "stat" }, el("div", { class: "v" }, value), el("div", { class: "k" }, key));
  }

  function matches(role) {
    const q = state.query.trim().toLowerCase();
    return !q || role.name.toLowerCase().includes(q) || String(role.category).toLowerCase().includes(q);
  }

  function renderList() {
    const shown = state.roles.filter(matches);
    const projections = state.roles.map((r) => r.projection);
    const lo = Math.min(...projections), hi = Math.max(...projections);
    const list = $("roles");
    list.replaceChildren(...shown.map((role) => {
      const width = hi > lo ? ((role.projection - lo) / (hi - lo)) * 100 : 50;
      return el("div", {
        class: `role-item${state.selected === role.name ? " selected" : ""}`, dataset: { role: role.name },
        onclick: () => select(role.name), title: `${role.name} (${role.category})`,
      },
      el("span", {}, el("span", { class: "dot", style: `background:${colorOf(role.category)}` }), role.name),
      el("div", { class: "bar" }, el("span", { style: `width:${width.toFixed(1)}%` })),
      el("span", { class: "num" }, fmt(role.projection, 1)));
    }));
    if (!shown.length) list.append(el("div", { class: "muted", style: "padding:10px" }, "No role matches."));
    $("count").textContent = `${shown.length} of ${state.roles.length}`;
    scatter.setHighlight(state.query.trim() ? new Set(shown.map((r) => r.name)) : null);
  }

  async function select(name) {
    state.selected = name;
    scatter.setSelected(name);
    renderList();
    const item = document.querySelector(`.role-item[data-role="${CSS.escape(name)}"]`);
    if (item) item.scrollIntoView({ block: "nearest" });
    const panel = $("detail");
    panel.replaceChildren(el("h2", {}, name), el("p", { class: "muted" }, "Loading…"));
    try {
      const role = await PX.api(`/api/roles/${encodeURIComponent(name)}`);
      if (state.selected !== name) return;
      panel.replaceChildren(
        el("h2", {}, el("span", { class: "dot", style: `background:${colorOf(role.category)}` }), role.name),
        el("div", { class: "muted small" }, `${role.category} · projection ${fmt(role.projection)} · PC ${role.pc.map((v) => fmt(v, 1)).join(", ")}`),
        role.description ? el("p", {}, role.description) : null,
        el("h3", {}, `System prompts (${role.system_prompts.length})`),
        ...role.system_prompts.map((p) => el("div", { class: "prompt" }, p)),
        el("h3", {}, role.samples.length ? "Sample answer" + (role.samples.length > 1 ? "s" : "") : "No sample answer in this run"),
        ...role.samples.map((s) => el("div", { class: "sample" }, el("b", {}, s.question), "\n", s.answer)),
      );
    } catch (error) {
      panel.replaceChildren(el("h2", {}, name), el("p", { class: "muted" }, error.message));
    }
  }

  function drawVariance(layerIndex) {
    const layer = state.space.layers.find((l) => l.layer === layerIndex) || state.space.layers[0];
    const values = (layer.explained_variance || []).slice(0, 10);
    let cumulative = 0;
    variance.update(values.map((v, i) => {
      cumulative += v;
      return { label: `PC${i + 1}`, value: v, color: i < 3 ? "#2f6fde" : "#9fb7e8",
        tip: `PC${i + 1}: ${(v * 100).toFixed(1)}% (cumulative ${(cumulative * 100).toFixed(1)}%)` };
    }));
  }

  function drawCosines() {
    const layers = state.space.layers;
    const target = state.space.target_layer;
    cosines.update({
      series: [
        { id: "cos", name: "cos", color: "#2f6fde", r: 3, points: layers.map((l) => ({ x: l.layer, y: l.cos_pc1_axis,
          r: l.layer === target ? 6 : 3, tip: `layer ${l.layer}${l.layer === target ? " (target)" : ""}\ncos(PC1, axis) ${fmt(l.cos_pc1_axis, 3)}` })) },
        { id: "pc1", name: "pc1", color: "#e07b24", r: 3, points: layers.map((l) => ({ x: l.layer, y: l.pc1_explained_variance,
          tip: `layer ${l.layer}\nPC1 explains ${(l.pc1_explained_variance * 100).toFixed(1)}%` })) },
      ],
      hlines: [{ y: 0.6, label: "0.60", color: "#98a2b3", dash: "3 4" }],
    });
  }

  function setView(view) {
    for (const b of $("views").querySelectorAll("button")) b.classList.toggle("active", b.dataset.view === view);
    scatter.setView(view);
  }

  async function init() {
    scatter = new PX.Scatter($("scatter"), { width: 700, height: 520 });
    variance = new PX.BarChart($("variance"), { yLabel: "variance explained", width: 560, height: 240 });
    cosines = new PX.LineChart($("cosines"), { xLabel: "layer", yLabel: "", width: 560, height: 240,
      margin: { top: 14, right: 44, bottom: 38, left: 46 }, minX: 0 });
    PX.loadInfo().catch(() => {});
    try {
      state.space = await PX.api("/api/space");
    } catch (error) {
      PX.showError(error);
      document.body.dataset.ready = "true";
      return;
    }
    const space = state.space;
    state.roles = [...space.roles].sort((a, b) => b.projection - a.projection);
    const t = space.target || {};
    const pos = space.default_position || {};
    $("stats").replaceChildren(
      stat(space.model, "model"), stat(String(space.target_layer), "target layer"), stat(String(space.roles.length), "roles"),
      stat(fmt(t.cos_pc1_axis, 3), "cos(PC1, axis)"), stat(`${((t.pc1_explained_variance || 0) * 100).toFixed(1)}%`, "PC1 variance"),
      stat(fmt(pos.pc1_fraction, 2), "default along PC1 (0 = role end, 1 = Assistant end)"),
    );
    $("scatter-title").textContent = `Roles in persona space (layer ${space.target_layer}; PC1 oriented toward the default Assistant)`;
    scatter.vline = Number.isFinite(pos.pc1) ? { x: pos.pc1, label: "default" } : null;
    scatter.setData(state.roles.map((r) => ({
      id: r.name, name: r.name, coords: r.pc, color: colorOf(r.category),
      tip: `<b>${PX.escape(r.name)}</b> (${PX.escape(r.category)})\nprojection on the axis ${fmt(r.projection)}\nPC1 ${fmt(r.pc[0], 1)} · PC2 ${fmt(r.pc[1], 1)} · PC3 ${fmt(r.pc[2], 1)}`,
    })));
    scatter.onClick = select;
    $("categories").replaceChildren(...Object.entries(state.colors).map(([c, color]) =>
      el("span", {}, el("span", { class: "dot", style: `background:${color}` }), c)));
    for (const b of $("views").querySelectorAll("button")) b.addEventListener("click", () => setView(b.dataset.view));
    const layerSelect = $("layer-select");
    for (const l of space.layers) layerSelect.append(el("option", { value: l.layer }, String(l.layer)));
    layerSelect.value = String(space.target_layer);
    layerSelect.addEventListener("change", () => drawVariance(Number(layerSelect.value)));
    drawVariance(space.target_layer);
    drawCosines();
    $("search").addEventListener("input", (e) => { state.query = e.target.value; renderList(); });
    $("search").addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      const first = state.roles.find(matches);
      if (first) select(first.name);
    });
    renderList();
    document.body.dataset.ready = "true";
  }

  document.addEventListener("DOMContentLoaded", init);
})();
