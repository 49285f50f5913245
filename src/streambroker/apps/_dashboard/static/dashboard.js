// The dashboard's live figures: polls the JSON of /api/figures and draws it. Every value
// is set as text (never as HTML); the server escaped the control characters already.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function chart(values, label) {
  const width = 120, height = 24;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const top = Math.max(1, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 1 - (v / top) * (height - 2)).toFixed(1)}`);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return svg;
}

function figure(field, value) {
  return el("td", { "data-field": field, class: "num" }, value);
}

function groupRows(group) {
  const row = el("tr", { class: group.stopped ? "group stopped" : "group", "data-group": group.group },
    el("td", { class: "name" }, el("a", { href: group.url }, group.group)),
    figure("lag", group.lag),
    figure("lag_seconds", group.lag_seconds),
    figure("pending", group.pending),
    figure("dead_letters", group.dead_letters),
    figure("consumers", `${group.live} live / ${group.stale} stale`),
    figure("acked_per_s", group.acked_per_s),
    el("td", {}, chart(group.acked_series, `acknowledged per second by ${group.group}`)));
  const rows = [row];
  for (const consumer of group.consumers) {
    rows.push(el("tr", { class: consumer.alive ? "consumer" : "consumer stale", "data-consumer": consumer.name },
      el("td", { class: "name" }, consumer.name),
      el("td"), el("td"),
      figure("pending", consumer.pending),
      el("td"),
      figure("alive", consumer.alive ? `live, idle ${consumer.idle}` : `stale, idle ${consumer.idle}`),
      el("td"), el("td")));
  }
  return rows;
}

function streamSection(stream) {
  const head = el("tr", {}, ...["group / consumer", "lag", "lag age", "pending", "dead letters",
    "consumers", "acked/s", "last minute"].map((title) => el("th", {}, title)));
  const body = el("tbody", {});
  for (const group of stream.groups) body.append(...groupRows(group));
  for (const orphan of stream.orphan_groups) {
    body.append(el("tr", { class: "orphan" }, el("td", { class: "name", colspan: 8 }, `${orphan} (not registered)`)));
  }
  return el("section", { class: "stream", "data-stream": stream.stream },
    el("h2", {}, el("a", { href: stream.url, class: "name" }, stream.stream), ` (pool ${stream.pool})`),
    el("p", { class: "figures" },
      "length ", el("span", { "data-field": "length" }, stream.length),
      ", oldest event ", el("span", { "data-field": "oldest" }, stream.oldest),
      ", published/s ", el("span", { "data-field": "published_per_s" }, stream.published_per_s), " ",
      chart(stream.published_series, `published per second to ${stream.stream}`)),
    el("table", { class: "groups" }, el("thead", {}, head), body));
}

function draw(figures) {
  const error = document.getElementById("error");
  error.hidden = !figures.error;
  error.textContent = figures.error ? `Cannot read the statistics: ${figures.error}` : "";
  document.getElementById("alerts").replaceChildren(...figures.alerts.map((alert) =>
    el("div", { class: "alert", role: "alert", "data-stream": alert.stream, "data-group": alert.group },
      alert.message)));
  document.getElementById("span").textContent = figures.span ?? 0;
  document.getElementById("streams").replaceChildren(...figures.streams.map(streamSection));
}

async function poll(url) {
  const status = document.getElementById("status");
  try {
    const reply = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    draw(await reply.json());
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.classList.remove("stale");
  } catch (problem) {
    status.textContent = `not updated: ${problem.message}`;
    status.classList.add("stale");
  }
  setTimeout(() => poll(url), POLL_MS);
}

document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("streams");
  if (live) poll(live.dataset.live);
});
