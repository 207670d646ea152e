/* personaxis — an offline API reference rendered from /openapi.json (no Swagger UI, no CDN). */
"use strict";

(function () {
  const { el } = PX;
  const $ = (id) => document.getElementById(id);
  let spec = null;

  function refName(ref) { return ref.split("/").pop(); }

  function resolve(schema) {
    return schema && schema.$ref ? spec.components.schemas[refName(schema.$ref)] || {} : schema || {};
  }

  function typeOf(schema) {
    if (!schema) return "any";
    if (schema.$ref) return refName(schema.$ref);
    if (schema.anyOf) return schema.anyOf.map(typeOf).join(" | ");
    if (schema.type === "array") return `${typeOf(schema.items)}[]`;
    if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
    if (schema.const !== undefined) return JSON.stringify(schema.const);
    return schema.type || "any";
  }

  function table(schema) {
    const s = resolve(schema);
    const props = s.properties || {};
    const required = new Set(s.required || []);
    if (!Object.keys(props).length) return el("div", { class: "small" }, el("code", {}, typeOf(schema)));
    return el("table", { class: "schema-table" },
      el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, "description")),
      ...Object.entries(props).map(([name, p]) => el("tr", {},
        el("td", {}, el("code", {}, name), required.has(name) ? " *" : ""),
        el("td", {}, el("code", {}, typeOf(p))),
        el("td", {}, [p.description || "", p.default !== undefined ? ` (default ${JSON.stringify(p.default)})` : ""].join("")))));
  }

  function example(schema) {
    const s = resolve(schema);
    return s.example || (s.examples && s.examples[0]) || null;
  }

  async function tryIt(method, path, textarea, out) {
    out.style.display = "block";
    out.textContent = "…";
    try {
      const init = { method: method.toUpperCase(), headers: {} };
      if (textarea) { init.headers["content-type"] = "application/json"; init.body = textarea.value; }
      const response = await fetch(path, init);
      const text = await response.text();
      let shown = text;
      try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* a stream */ }
      out.textContent = `${response.status} ${response.statusText}\n\n${shown}`;
    } catch (error) {
      out.textContent = String(error);
    }
  }

  function endpoint(path, method, op) {
    const body = el("div", { class: "body" });
    if (op.description) body.append(el("p", { style: "white-space:pre-wrap" }, op.description));
    const params = op.parameters || [];
    if (params.length) {
      body.append(el("h3", {}, "Parameters"), el("table", { class: "schema-table" }, ...params.map((p) =>
        el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in), el("td", {}, el("code", {}, typeOf(p.schema)))))));
    }
    let textarea = null;
    const request = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
    if (request) {
      body.append(el("h3", {}, `Request body: ${typeOf(request.schema)}`), table(request.schema));
      const ex = example(request.schema);
      textarea = el("textarea", { rows: 6, class: "code", style: "font-family:var(--mono);margin-top:8px" },
        ex ? JSON.stringify(ex, null, 2) : "{}");
    }
    body.append(el("h3", {}, "Responses"));
    for (const [code, response] of Object.entries(op.responses || {})) {
      const content = response.content || {};
      const json = content["application/json"];
      const types = Object.keys(content).join(", ");
      body.append(el("div", { class: "small" }, el("b", {}, code), ` ${response.description || ""}`,
        json && json.schema ? el("span", {}, " — ", el("code", {}, typeOf(json.schema))) : types ? ` (${types})` : ""));
    }
    if (!path.includes("{")) {
      const out = el("pre", { class: "code", style: "display:none" }, "");
      body.append(el("h3", {}, "Try it"), textarea || "", el("div", { class: "buttons", style: "margin:6px 0" },
        el("button", { type: "button", onclick: () => tryIt(method, path, textarea, out) }, "Send")), out);
    }
    return el("details", { class: "endpoint", id: `${method}-${path}` },
      el("summary", {}, el("span", { class: `method ${method}` }, method.toUpperCase()), el("span", { class: "path" }, path),
        el("span", { class: "muted" }, op.summary || "")), body);
  }

  async function init() {
    PX.loadInfo().catch(() => {});
    try {
      spec = await PX.api("/openapi.json");
    } catch (error) {
      PX.showError(error);
      return;
    }
    $("api-title").textContent = `${spec.info.title} ${spec.info.version} — API reference`;
    $("api-description").textContent = spec.info.description || "";
    const groups = {};
    for (const [path, methods] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(methods)) {
        const tag = (op.tags && op.tags[0]) || "other";
        (groups[tag] = groups[tag] || []).push(endpoint(path, method, op));
      }
    }
    $("endpoints").replaceChildren(...Object.entries(groups).flatMap(([tag, nodes]) => [el("h3", {}, tag), ...nodes]));
    $("schemas").replaceChildren(...Object.entries(spec.components.schemas).map(([name, schema]) =>
      el("details", { class: "endpoint" }, el("summary", {}, el("code", {}, name), el("span", { class: "muted small" },
        (schema.description || "").split("\n")[0])), el("div", { class: "body" }, table({ $ref: `#/components/schemas/${name}` })))));
    document.body.dataset.ready = "true";
  }

  document.addEventListener("DOMContentLoaded", init);
})();
