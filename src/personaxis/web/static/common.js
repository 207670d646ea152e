/* personaxis — shared helpers: DOM building, JSON API calls, server-sent-event streams over fetch. */
"use strict";

const PX = (window.PX = window.PX || {});

PX.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
};

PX.svg = function (tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) if (child) node.append(child);
  return node;
};

PX.fmt = function (value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e4 || abs < 1e-3)) return value.toExponential(2);
  return value.toFixed(digits);
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
PX.ApiError = ApiError;

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  return new ApiError(response.status, message);
}

PX.api = async function (path, body, options = {}) {
  const init = { method: body === undefined ? "GET" : "POST", headers: {}, signal: options.signal };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorFrom(response);
  return response.json();
};

/* POST a JSON body and call onEvent(name, data) for each server-sent event of the streamed response. */
PX.stream = async function (path, body, onEvent, signal) {
  const response = await fetch(path, {
    method: "POST", headers: { "content-type": "application/json", accept: "text/event-stream" },
    body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const dispatch = (raw) => {
    let name = "message";
    const data = [];
    for (const line of raw.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length) onEvent(name, JSON.parse(data.join("\n")));
  };
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      dispatch(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
    }
  }
  if (buffer.trim()) dispatch(buffer);
};

PX.showError = function (error) {
  const banner = document.getElementById("error");
  if (!banner) return;
  if (!error) { banner.classList.remove("show"); banner.textContent = ""; return; }
  banner.textContent = error.message || String(error);
  banner.classList.add("show");
};

PX.markNav = function () {
  for (const link of document.querySelectorAll("header.top nav a")) {
    if (link.getAttribute("href") === location.pathname) link.classList.add("active");
  }
};

PX.info = null;
PX.loadInfo = async function () {
  PX.info = await PX.api("/api/info");
  const label = document.querySelector("header.top .model");
  if (label) label.textContent = `${PX.info.model} · axis layer ${PX.info.layer} of ${PX.info.n_layers}`;
  return PX.info;
};

PX.CATEGORY_COLORS = ["#2f6fde", "#e07b24", "#2e9b5f", "#b23aa6", "#c9342f", "#1a9bb0", "#7a5cd6", "#8a6d1f",
  "#d6497f", "#4f7a28", "#5b6476", "#d18f00"];

document.addEventListener("DOMContentLoaded", PX.markNav);
