/* personaxis — chat page: streamed answers, live projection chart, capping (off / always / guard mode) with the guard's
   switches shown in the answer, steering slider, capped replay. */
"use strict";

(function () {
  const { el, fmt } = PX;
  const $ = (id) => document.getElementById(id);
  const COLORS = { live: "#2f6fde", capped: "#e07b24", replay: "#e07b24", floor: "#c9342f", def: "#2e9b5f", role: "#98a2b3" };

  const state = { turns: [], replay: [], replayLabel: "", pending: null, busy: false, controller: null, info: null };
  let chart;

  function experimentLabel(exp) {
    const m = /^layers_(\d+):(\d+)-p([0-9.eE+-]+)$/.exec(exp.id);
    if (!m) return exp.id;
    return `layers ${m[1]}–${Number(m[2]) - 1} · ${Math.round(Number(m[3]) * 100)}th percentile`;
  }

  function selectedExperiment() {
    const id = $("experiment").value;
    return (state.info.experiments || []).find((e) => e.id === id) || null;
  }

  function capMode() {
    const checked = document.querySelector("input[name=cap-mode]:checked");
    return checked ? checked.value : "off";
  }

  /* A turn's answer was capped: always-on capping, or guard mode that switched capping on for some tokens. */
  function wasCapped(t) { return !!t.cap && (t.cap !== "auto" || t.capped_tokens > 0); }

  function floorValue() {
    if (capMode() === "auto" && state.info.guard) return state.info.guard.threshold;
    const exp = selectedExperiment();
    if (exp && exp.floor !== null && exp.floor !== undefined) return exp.floor;
    return state.info.floor;
  }

  function treatment(forceCap) {
    const exp = selectedExperiment();
    const mode = forceCap ? "always" : capMode();
    const cap = mode === "auto" ? "auto" : mode === "always" && exp ? exp.id : null;
    return { cap, alpha: Number($("alpha").value) };
  }

  function describe(t) {
    const parts = [];
    if (t.cap === "auto") parts.push("guard (auto)");
    else if (t.cap) parts.push(`capped (${t.cap})`);
    if (t.alpha) parts.push(`α ${t.alpha > 0 ? "+" : ""}${t.alpha.toFixed(2)}`);
    return parts.length ? parts.join(" · ") : "no intervention";
  }

  function tip(label, turn, value, t, text) {
    const short = text.length > 180 ? `${text.slice(0, 179)}…` : text;
    return `<b>${label}, turn ${turn}</b>\nprojection ${fmt(value)}\n${PX.escape(describe(t))}\n\n${PX.escape(short)}`;
  }

  function redraw() {
    const live = state.turns.map((t, i) => ({
      x: i + 1, y: t.projection, marker: wasCapped(t) ? "diamond" : "circle", color: wasCapped(t) ? COLORS.capped : COLORS.live,
      cls: wasCapped(t) ? "capped" : "uncapped", attrs: { "data-capped": wasCapped(t) ? "true" : "false" },
      tip: tip("Live", i + 1, t.projection, t, t.answer),
    }));
    const replay = state.replay.map((t, i) => ({
      x: i + 1, y: t.projection, marker: "diamond", cls: "capped replayed", color: "#fff",
      attrs: { "data-capped": "true", stroke: COLORS.replay, "stroke-width": 2 },
      tip: tip("Replay", i + 1, t.projection, t, t.answer),
    }));
    const series = [];
    if (replay.length) series.push({ id: "replay", name: "replay", color: COLORS.replay, dashed: true, r: 7, points: replay });
    series.push({ id: "live", name: "this conversation", color: COLORS.live, points: live });
    const hlines = [];
    const floor = floorValue();
    const ref = state.info.reference || {};
    if (Number.isFinite(floor)) hlines.push({ y: floor, label: `floor ${fmt(floor)}`, color: COLORS.floor, dash: "7 4", cls: "floor" });
    if (Number.isFinite(ref.default_projection)) hlines.push({ y: ref.default_projection, label: "default", color: COLORS.def, dash: "2 4" });
    if (Number.isFinite(ref.role_min)) hlines.push({ y: ref.role_min, label: ref.role_min_name || "roles", color: COLORS.role, dash: "2 4" });
    let pending = null;
    if (state.pending && Number.isFinite(state.pending.y)) pending = { ...state.pending, label: "…" };
    chart.update({ series, hlines, pending });
    const legend = $("legend");
    legend.replaceChildren(
      el("span", {}, el("i", { style: `background:${COLORS.live}` }), "answer (●) "),
      el("span", {}, el("i", { style: `background:${COLORS.capped}` }), "capped answer (◆)"),
      replay.length ? el("span", { style: `color:${COLORS.replay}` }, el("i", { class: "dash" }), state.replayLabel) : null,
      Number.isFinite(floor) ? el("span", { style: `color:${COLORS.floor}` }, el("i", { class: "dash" }), `calibrated floor at layer ${state.info.layer}`) : null,
      Number.isFinite(ref.default_projection) ? el("span", { style: `color:${COLORS.def}` }, el("i", { class: "dash" }), "default condition (run)") : null,
    );
    $("replay").disabled = state.busy || !state.turns.length || !(state.info.experiments || []).length;
  }

  function bubble(role, text, extra) {
    const node = el("div", { class: `msg ${role} ${extra || ""}` }, el("span", { class: "text" }, text));
    $("messages").append(node);
    node.scrollIntoView({ block: "end" });
    return node;
  }

  function setMeta(node, text) {
    let meta = node.querySelector(".meta");
    if (!meta) { meta = el("span", { class: "meta" }); node.append(meta); }
    meta.textContent = text;
  }

  function setBusy(busy) {
    state.busy = busy;
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("clear").disabled = busy;
    redraw();
  }

  function systemMessages() {
    const system = $("system").value.trim();
    return system ? [{ role: "system", content: system }] : [];
  }

  /* Stream one answer; returns {text, projection, ...} from the `done` event, or null when stopped. */
  async function streamAnswer(messages, t, node, x) {
    const textNode = node.querySelector(".text");
    let done = null;
    let capping = !!t.cap && t.cap !== "auto";
    state.controller = new AbortController();
    node.classList.add("streaming");
    try {
      await PX.stream("/api/chat/stream", {
        messages, cap: t.cap, alpha: t.alpha, max_tokens: Number($("max-tokens").value) || 96,
        temperature: Number($("temperature").value) || 0,
      }, (event, data) => {
        if (event === "token") {
          textNode.append(data.delta);
          state.pending = { x, y: data.projection, color: capping ? COLORS.capped : COLORS.live };
          $("running").textContent = fmt(data.projection);
          redraw();
          node.scrollIntoView({ block: "end" });
        } else if (event === "guard") {  // guard mode switched capping on or off: a mark where it happened
          capping = data.capping;
          const what = data.capping ? "guard: capping on" : "guard: capping off";
          textNode.append(el("span", { class: "guard-switch", "data-capping": String(data.capping),
            title: `after ${data.n_tokens} tokens; mean projection of the window ${fmt(data.projection)}` }, what));
        } else if (event === "done") {
          done = data;
        } else if (event === "error") {
          throw new PX.ApiError(data.error.code, data.error.message);
        }
      }, state.controller.signal);
    } catch (error) {
      if (error.name !== "AbortError") throw error;
    } finally {
      node.classList.remove("streaming");
      state.pending = null;
      state.controller = null;
    }
    if (done) {
      const switches = done.guard_switches || [];
      if (!switches.length || !done.text) textNode.textContent = done.text || "(no answer)";  // else keep the marks
      const guard = t.cap === "auto"
        ? ` · ${switches.length} guard switch${switches.length === 1 ? "" : "es"}, ${done.capped_tokens}/${done.new_tokens} tokens capped`
        : "";
      setMeta(node, `projection ${fmt(done.projection)} · ${describe(t)} · ${done.new_tokens} tokens${guard}`);
      if (wasCapped({ ...t, capped_tokens: done.capped_tokens })) node.classList.add("capped");
      $("last").textContent = fmt(done.projection);
    } else {
      setMeta(node, "stopped");
    }
    return done;
  }

  async function send(event) {
    if (event) event.preventDefault();
    if (state.busy) return;
    const text = $("message").value.trim();
    if (!text) { PX.showError(new Error("Write a message first.")); return; }
    PX.showError(null);
    $("message").value = "";
    const t = treatment(false);
    const history = state.turns.flatMap((turn) => [{ role: "user", content: turn.user }, { role: "assistant", content: turn.answer }]);
    const messages = [...systemMessages(), ...history, { role: "user", content: text }];
    const userNode = bubble("user", text);
    const node = bubble("assistant", "", t.cap && t.cap !== "auto" ? "capped" : "");
    setBusy(true);
    try {
      const done = await streamAnswer(messages, t, node, state.turns.length + 1);
      if (done && done.text) {
        state.turns.push({ user: text, answer: done.text, projection: done.projection, capped_tokens: done.capped_tokens, ...t });
        if (state.replay.length) { state.replay = []; state.replayLabel = ""; }
      } else {
        userNode.remove();
        if (!done) node.remove(); else setMeta(node, "the model gave no answer; this turn is left out of the conversation");
        $("message").value = text;
      }
    } catch (error) {
      PX.showError(error);
      userNode.remove();
      node.remove();
      $("message").value = text;
    } finally {
      setBusy(false);
    }
  }

  async function replay() {
    if (state.busy || !state.turns.length) return;
    PX.showError(null);
    const t = treatment(true);
    state.replay = [];
    state.replayLabel = `replay with capping (${t.cap})`;
    setBusy(true);
    const liveNodes = [...document.querySelectorAll("#messages .msg.assistant")];
    for (const old of document.querySelectorAll("#messages .msg.replay")) old.remove();
    const history = [];
    try {
      for (let i = 0; i < state.turns.length; i++) {
        const user = state.turns[i].user;
        const node = el("div", { class: "msg replay" }, el("span", { class: "text" }, ""));
        liveNodes[i].after(node);
        const done = await streamAnswer([...systemMessages(), ...history, { role: "user", content: user }], t, node, i + 1);
        if (!done || !done.text) break;
        setMeta(node, `replay · projection ${fmt(done.projection)} · ${describe(t)}`);
        state.replay.push({ answer: done.text, projection: done.projection, ...t });
        history.push({ role: "user", content: user }, { role: "assistant", content: done.text });
        redraw();
      }
    } catch (error) {
      PX.showError(error);
    } finally {
      setBusy(false);
    }
  }

  function clear() {
    state.turns = []; state.replay = []; state.replayLabel = "";
    $("messages").replaceChildren();
    $("running").textContent = "—"; $("last").textContent = "—";
    PX.showError(null);
    redraw();
  }

  function capNote() {
    const exp = selectedExperiment();
    const note = $("cap-note");
    if (!(state.info.experiments || []).length) {
      note.textContent = "No capping config: run `personaxis calibrate --run RUN` and restart the server to enable capping.";
      return;
    }
    const floor = floorValue();
    const guard = state.info.guard;
    if (capMode() === "auto" && guard) {
      note.textContent = `Guard mode: capping (${guard.experiment}) switches on when the mean projection of the last ` +
        `${guard.window} tokens falls below ${fmt(guard.threshold)} at layer ${state.info.layer}, and off again above ` +
        `${fmt(guard.threshold + guard.hysteresis)}; each switch is marked in the answer.`;
      redraw();
      return;
    }
    note.textContent = `${exp ? experimentLabel(exp) : ""}: a floor on the projection at every token of the capped layers.` +
      (Number.isFinite(floor) ? ` At the monitored layer ${state.info.layer} the calibrated floor is ${fmt(floor)}.` : "");
    redraw();
  }

  async function init() {
    chart = new PX.LineChart($("chart"), { xLabel: "assistant turn", yLabel: "projection on the axis", width: 640, height: 330,
      emptyText: "Send a message: each answer adds a point here." });
    try {
      state.info = await PX.loadInfo();
    } catch (error) {
      PX.showError(error);
      return;
    }
    const select = $("experiment");
    const experiments = state.info.experiments || [];
    for (const exp of experiments) select.append(el("option", { value: exp.id }, experimentLabel(exp)));
    const fixed = state.info.default_cap !== "auto" ? state.info.default_cap : null;
    const preferred = fixed || (experiments.find((e) => /-p0\.25$/.test(e.id)) || experiments[0] || {}).id;
    if (preferred) select.value = preferred;
    const mode = state.info.default_cap === "auto" && state.info.guard ? "auto" : state.info.default_cap ? "always" : "off";
    $(`cap-${mode}`).checked = true;
    $("cap-always").disabled = !experiments.length;
    $("cap-auto").disabled = !state.info.guard;
    select.disabled = !experiments.length;
    $("alpha").value = state.info.default_alpha || 0;
    $("max-tokens").max = state.info.limits.max_new_tokens;
    $("readout-note").textContent = `layer ${state.info.layer}; higher = more Assistant-like`;
    const alphaText = () => { const a = Number($("alpha").value); $("alpha-value").textContent = `${a >= 0 ? "+" : ""}${a.toFixed(2)}`; };
    $("alpha").addEventListener("input", alphaText);
    $("alpha-reset").addEventListener("click", () => { $("alpha").value = 0; alphaText(); });
    alphaText();
    select.addEventListener("change", capNote);
    for (const radio of document.querySelectorAll("input[name=cap-mode]")) radio.addEventListener("change", capNote);
    $("composer").addEventListener("submit", send);
    $("message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); });
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("replay").addEventListener("click", replay);
    $("clear").addEventListener("click", clear);
    capNote();
    redraw();
    document.body.dataset.ready = "true";
  }

  document.addEventListener("DOMContentLoaded", init);
})();
