// crma dashboard: loads the server-rendered views with the API key, draws line charts as
// inline SVG, follows a running job by polling its series every 2 s, and runs "Try it".
"use strict";

const KEY = "crma-api-key";
const POLL_MS = 2000;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
let timer = null;

// -- requests with the key -------------------------------------------------------------------
async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message;
    } catch (_) { /* not an OpenAI-shaped error */ }
    if (response.status === 401) {
      message = sessionStorage.getItem(KEY)
        ? "Wrong API key: the server refused it. Enter the key `crma serve` was started with."
        : "This server needs an API key: enter it above.";
    }
    throw new Error(message);
  }
  return response;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// -- views ----------------------------------------------------------------------------------------
async function route() {
  clearTimeout(timer);
  const [view, id] = (location.hash.slice(1) || "stack").split("/");
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.dataset.view !== view;
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === (view === "job" ? "jobs" : view));
  }
  if (view === "try") return showError("");
  const section = document.getElementById(`view-${view}`);
  if (!section) return showError(`No view "${view}".`);
  const path = view === "job" ? `/ui/jobs/${encodeURIComponent(id || "")}` : `/ui/${view}`;
  try {
    section.innerHTML = await (await api(path)).text();
    showError("");
  } catch (error) {
    section.innerHTML = "";
    return showError(error.message);
  }
  drawStatic(section);
  loadImages(section);
  if (view === "job") followJob(section.querySelector("#job"));
  if (view === "jobs") timer = setTimeout(route, 5000);
}

function drawStatic(root) {
  for (const el of root.querySelectorAll("[data-chart]")) {
    const spec = JSON.parse(el.dataset.chart);
    lineChart(el, spec.x, spec.series, spec.xlabel);
  }
}

async function loadImages(root) {
  for (const img of root.querySelectorAll("img[data-src]")) {
    try {
      img.src = URL.createObjectURL(await (await api(img.dataset.src)).blob());
    } catch (error) {
      img.alt = error.message;
    }
  }
}

// -- a job: its charts grow as steps arrive --------------------------------------------------------
function followJob(el) {
  const id = el.dataset.job;
  const data = { steps: [], loss: [], lr: [], grad_norm: [], grad_norm_clipped: [], m_dev: [] };
  const cancel = document.getElementById("cancel");
  if (cancel) {
    cancel.onclick = async () => {
      cancel.disabled = true;
      try {
        await api(`/v1/fine_tuning/jobs/${id}/cancel`, { method: "POST" });
      } catch (error) {
        showError(error.message);
      }
    };
  }
  async function poll() {
    if (location.hash !== `#job/${id}`) return;
    let series;
    try {
      const after = data.steps.length ? data.steps[data.steps.length - 1] : 0;
      series = await (await api(`/ui/jobs/${id}/series?after=${after}`)).json();
    } catch (error) {
      showError(error.message);
      timer = setTimeout(poll, POLL_MS);
      return;
    }
    for (const name of Object.keys(data)) data[name].push(...series[name]);
    for (const chart of el.querySelectorAll(".chart[data-series]")) {
      const names = chart.dataset.series.split(" ");
      const lines = names.map((name) => ({ name: name.replaceAll("_", " "), y: data[name] }));
      lineChart(chart, data.steps, lines, "step", names[0] === "grad_norm");
    }
    updateProgress(series);
    const active = ["validating_files", "queued", "running"].includes(series.status);
    if (active) timer = setTimeout(poll, POLL_MS);
    else if (el.dataset.status !== series.status) route(); // finished meanwhile: show its end
  }
  poll();
}

function updateProgress(series) {
  const p = series.progress;
  const set = (id, text) => {
    const node = document.getElementById(id);
    if (node) node.textContent = text;
  };
  set("job-status", series.status);
  document.getElementById("job-status").className = `status ${series.status}`;
  set("job-step", p.step);
  if (series.total_steps) set("job-total", series.total_steps);
  set("job-eta", series.status === "running" && p.eta_s != null ? duration(p.eta_s) : "–");
  const bar = document.getElementById("job-progress");
  if (bar && p.fraction != null) bar.value = p.fraction;
}

function duration(s) {
  s = Math.round(s);
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
}

// -- line charts as inline SVG ----------------------------------------------------------------------
function lineChart(el, xs, series, xlabel, log = false) {
  const W = 420, H = 180, L = 56, R = 10, T = 10, B = 30;
  const f = (v) => (log ? Math.log10(Math.max(v, 1e-12)) : v);
  const ys = series.flatMap((s) => s.y).filter((v) => v != null && isFinite(v)).map(f);
  el.dataset.points = String(xs.length);
  if (!xs.length || !ys.length) {
    el.innerHTML = `<p class="note">waiting for the first step…</p>`;
    return;
  }
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) [y0, y1] = [y0 - (Math.abs(y0) || 1) * 0.05, y1 + (Math.abs(y1) || 1) * 0.05];
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) === Math.min(...xs) ? Math.min(...xs) + 1 : Math.max(...xs)];
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (f(y) - y0) / (y1 - y0)) * (H - T - B);
  const short = (v) => (Math.abs(v) < 1e-3 && v !== 0 ? v.toExponential(2) : +v.toPrecision(5));
  const label = (v) => short(log ? 10 ** v : v);
  let svg = `<svg viewBox="0 0 ${W} ${H}" role="img">`;
  svg += `<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"/><line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"/>`;
  svg += `<text x="${L - 4}" y="${T + 8}" text-anchor="end">${label(y1)}</text><text x="${L - 4}" y="${H - B}" text-anchor="end">${label(y0)}</text>`;
  svg += `<text x="${L}" y="${H - 8}">${x0}</text><text x="${W - R}" y="${H - 8}" text-anchor="end">${x1}</text>`;
  svg += `<text x="${(L + W) / 2}" y="${H - 8}" text-anchor="middle">${xlabel}</text>`;
  series.forEach((s, i) => {
    const pts = xs.map((x, j) => (s.y[j] == null ? null : `${px(x).toFixed(1)},${py(s.y[j]).toFixed(1)}`)).filter(Boolean);
    const color = COLORS[i % COLORS.length];
    const dash = i > 0 ? ' stroke-dasharray="4 3"' : "";
    svg += `<polyline fill="none" stroke="${color}" stroke-width="1.5"${dash} points="${pts.join(" ")}"/>`;
    if (series.length > 1) svg += `<text x="${W - R}" y="${T + 10 + 12 * i}" text-anchor="end" fill="${color}">${s.name}</text>`;
  });
  const last = series[0].y[series[0].y.length - 1];
  el.innerHTML = `${svg}</svg><p class="last">last: ${last == null ? "–" : +Number(last).toPrecision(4)}</p>`;
}

// -- try it ---------------------------------------------------------------------------------------
async function ask(event) {
  event.preventDefault();
  const button = event.submitter || event.target.querySelector("button");
  button.disabled = true;
  try {
    const body = {
      model: "auto",
      messages: [{ role: "user", content: document.getElementById("prompt").value }],
      max_tokens: Number(document.getElementById("max-tokens").value),
      temperature: 0,
    };
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    showAnswer(await response.json());
    showError("");
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
  }
}

function showAnswer(answer) {
  const info = answer.crma;
  document.getElementById("answer").hidden = false;
  document.getElementById("answer-domain").textContent = info.domain;
  document.getElementById("answer-confidence").textContent =
    info.confidence == null ? "– (not routed)" : `${(100 * info.confidence).toFixed(1)}%`;
  document.getElementById("answer-text").textContent = answer.choices[0].message.content;
  const table = document.getElementById("answer-scores");
  table.innerHTML = "";
  for (const [domain, p] of Object.entries(info.scores || {}).sort((a, b) => b[1] - a[1])) {
    const row = table.insertRow();
    row.dataset.domain = domain;
    row.insertCell().textContent = domain;
    const cell = row.insertCell();
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(300 * p).toFixed(1)}px`;
    cell.append(bar, ` ${(100 * p).toFixed(1)}%`);
  }
}

// -- start ------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  const login = document.getElementById("login"); // only where the server has a key
  if (login) {
    const field = document.getElementById("key");
    field.value = sessionStorage.getItem(KEY) || "";
    login.addEventListener("submit", (event) => {
      event.preventDefault();
      if (field.value) sessionStorage.setItem(KEY, field.value);
      else sessionStorage.removeItem(KEY);
      route();
    });
  }
  document.getElementById("try-form").addEventListener("submit", ask);
  window.addEventListener("hashchange", route);
  route();
});
