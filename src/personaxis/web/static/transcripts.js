/* personaxis — transcripts page: pick or upload transcript files and compare their trajectories side by side. */
"use strict";

(function () {
  const { el, fmt } = PX;
  const $ = (id) => document.getElementById(id);
  const state = { info: null, server: [], uploads: [] };
  let chart;

  function color(i) { return PX.CATEGORY_COLORS[i % PX.CATEGORY_COLORS.length]; }

  function renderServer() {
    const box = $("server-list");
    if (!state.server.length) {
      box.replaceChildren(el("span", { class: "muted small" }, "None (start the server with --transcripts DIR, or put files in RUN/transcripts)."));
      return;
    }
    box.replaceChildren(...state.server.map((t) => el("label", {},
      el("input", { type: "checkbox", value: t.name, class: "server-pick" }),
      el("span", {}, el("b", {}, t.name), el("br"),
        el("span", { class: "muted small" }, `${t.assistant_turns} assistant turns`,
          ...Object.entries(t.meta).slice(0, 3).map(([k, v]) => el("span", { class: "chip" }, `${k}: ${v}`)))))));
  }

  function renderUploads() {
    $("upload-list").replaceChildren(...state.uploads.map((u, i) => el("label", {},
      el("input", { type: "checkbox", checked: true, class: "upload-pick", "data-index": i }),
      el("span", {}, el("b", {}, u.name), el("br"), el("span", { class: "muted small" }, u.note)))));
  }

  async function addFiles(files) {
    PX.showError(null);
    const limit = state.info ? state.info.limits.max_body_bytes : Infinity;
    for (const file of files) {
      const name = file.name.replace(/\.json$/i, "");
      if (file.size > limit) { PX.showError(new Error(`${file.name}: ${file.size} bytes, more than the server's limit of ${limit}`)); continue; }
      let data;
      try {
        data = JSON.parse(await file.text());
      } catch (error) {
        PX.showError(new Error(`${file.name}: not valid JSON (${error.message})`));
        continue;
      }
      const conversation = Array.isArray(data) ? data : data && data.conversation;
      const turns = Array.isArray(conversation) ? conversation.filter((m) => m && m.role === "assistant").length : 0;
      state.uploads.push({ name, data, note: `${turns} assistant turns · ${(file.size / 1024).toFixed(1)} KiB` });
    }
    renderUploads();
  }

  function tip(name, p) {
    return `<b>${PX.escape(name)}, turn ${p.turn + 1}</b>\nprojection ${fmt(p.projection)}${p.truncated ? " (history truncated)" : ""}` +
      `\n\nuser: ${PX.escape(p.user)}\n\nassistant: ${PX.escape(p.assistant)}`;
  }

  function render(result) {
    const hlines = Number.isFinite(result.floor) ? [{ y: result.floor, label: `floor ${fmt(result.floor)}`, color: "#c9342f", cls: "floor" }] : [];
    const ref = (state.info && state.info.reference) || {};
    if (Number.isFinite(ref.default_projection)) hlines.push({ y: ref.default_projection, label: "default", color: "#2e9b5f", dash: "2 4" });
    const series = result.trajectories.map((t, i) => ({
      id: t.name, name: t.name, color: color(i),
      points: t.turns.map((p) => ({ x: p.turn + 1, y: p.projection, tip: tip(t.name, p), marker: p.truncated ? "square" : "circle" })),
    }));
    chart.update({ series, hlines });
    $("legend").replaceChildren(...series.map((s) => el("span", {}, el("i", { style: `background:${s.color}` }), s.name)));
    $("multiples").replaceChildren(...result.trajectories.map((t, i) => {
      const box = el("div", { class: "panel trajectory", dataset: { name: t.name } });
      const values = t.turns.map((p) => p.projection);
      box.append(el("h2", {}, el("span", { class: "dot", style: `background:${color(i)}` }), t.name),
        el("div", { class: "small muted" }, ...Object.entries(t.meta).slice(0, 4).map(([k, v]) => el("span", { class: "chip" }, `${k}: ${v}`)),
          values.length ? ` first ${fmt(values[0])} → last ${fmt(values[values.length - 1])}` : ""));
      const holder = el("div");
      box.append(holder);
      const small = new PX.LineChart(holder, { width: 420, height: 200, xLabel: "assistant turn", yLabel: "projection",
        margin: { top: 10, right: 70, bottom: 34, left: 46 } });
      small.update({ series: [series[i]], hlines });
      return box;
    }));
  }

  async function show() {
    PX.showError(null);
    const picks = [...document.querySelectorAll(".server-pick:checked")].map((x) => x.value);
    const uploads = [...document.querySelectorAll(".upload-pick:checked")].map((x) => state.uploads[Number(x.dataset.index)]);
    if (!picks.length && !uploads.length) { PX.showError(new Error("Pick or upload at least one transcript.")); return; }
    $("show").disabled = true;
    try {
      const fromServer = await Promise.all(picks.map(async (name) => ({ name, data: await PX.api(`/api/transcripts/${encodeURIComponent(name)}`) })));
      const cap = $("tx-cap").value || null;
      const result = await PX.api("/api/transcripts/project", {
        transcripts: [...fromServer, ...uploads.map((u) => ({ name: u.name, data: u.data }))], cap, alpha: 0,
      });
      render(result);
    } catch (error) {
      PX.showError(error);
    } finally {
      $("show").disabled = false;
    }
  }

  async function init() {
    chart = new PX.LineChart($("chart"), { xLabel: "assistant turn", yLabel: "projection on the axis", width: 900, height: 360,
      emptyText: "Pick or upload transcripts, then “Show trajectories”." });
    try {
      state.info = await PX.loadInfo();
      for (const exp of state.info.experiments) $("tx-cap").append(el("option", { value: exp.id }, exp.id));
      state.server = (await PX.api("/api/transcripts")).transcripts;
    } catch (error) {
      PX.showError(error);
    }
    renderServer();
    $("upload").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
    const zone = $("dropzone");
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); addFiles([...e.dataTransfer.files]); });
    $("show").addEventListener("click", show);
    $("clear").addEventListener("click", () => {
      state.uploads = []; renderUploads(); chart.update({}); $("multiples").replaceChildren(); $("legend").replaceChildren();
    });
    document.body.dataset.ready = "true";
  }

  document.addEventListener("DOMContentLoaded", init);
})();
