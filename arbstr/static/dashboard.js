// arbstr's dashboard: reads the same JSON API as any client (/v1/stats, /v1/requests, /health)
// and draws it. No build step, nothing from outside this arbstr: uPlot is vendored beside this file.
"use strict";
(() => {
  const BUCKET_FOR_RANGE = { "1h": "1m", "24h": "15m", "7d": "1h", "30d": "6h", all: "1d" };
  const FILTERS = ["model", "provider", "policy"];
  const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                  "#9c755f", "#bab0ac"];
  const LIVE_EVERY_MS = 2000;
  const SUMMARY_EVERY_MS = 10000;

  // What the page shows, kept where a test (or a curious person in the console) can read it.
  const view = { range: "24h", model: "", provider: "", policy: "", charts: {}, data: {}, seen: new Set(), ready: false };
  window.arbstr = view;

  const $ = (id) => document.getElementById(id);

  async function get(path, okStatuses = [200]) {
    const answer = await fetch(path, { headers: { accept: "application/json" }, credentials: "same-origin", cache: "no-store" });
    if (answer.status === 401) {  // the session ended: the page itself asks for the token again
      window.location.assign("/dashboard");
      throw new Error("not signed in");
    }
    const body = await answer.json();
    if (!okStatuses.includes(answer.status)) throw new Error(body.error ? body.error.message : answer.statusText);
    return body;
  }

  function query(extra) {
    const params = new URLSearchParams({ range: view.range, ...extra });
    for (const name of FILTERS) if (view[name]) params.set(name, view[name]);
    return params.toString();
  }

  function sats(text) {
    const n = Number(text);
    if (!n) return "0";
    if (Math.abs(n) >= 100) return n.toLocaleString("en-US", { maximumFractionDigits: 0 });
    if (Math.abs(n) >= 1) return n.toLocaleString("en-US", { maximumFractionDigits: 2 });
    return n.toLocaleString("en-US", { maximumSignificantDigits: 3, maximumFractionDigits: 12 });
  }

  const ms = (v) => (v == null ? "–" : v < 10 ? v.toFixed(1) : String(Math.round(v)));
  const pct = (part, whole) => (whole ? (100 * part / whole) : 0);
  const pctText = (value) => (value >= 10 || value === 0 ? value.toFixed(0) : value.toFixed(1)) + "%";
  const label = (name) => name || "(none)";

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function chartSize(element) {
    return { width: Math.max(element.clientWidth, 200), height: window.innerWidth < 600 ? 180 : 230 };
  }

  function drawChart(name, element, options, data) {
    const old = view.charts[name];
    if (old) old.destroy();
    element.textContent = "";
    view.charts[name] = new uPlot({ ...chartSize(element), ...options }, data, element);
  }

  const resizing = new ResizeObserver(() => {
    for (const [name, chart] of Object.entries(view.charts)) chart.setSize(chartSize($("chart-" + name)));
  });

  function drawSpend(series) {
    const providers = Object.keys(series.cost_sats_by_provider)
      .map((name) => ({ name, values: series.cost_sats_by_provider[name].map(Number) }))
      .map((p) => ({ ...p, total: p.values.reduce((a, b) => a + b, 0) }))
      .sort((a, b) => b.total - a.total);
    // Stacked bars: each series is the running sum of the providers before it, drawn tallest first
    // so each provider's own part shows as its band.
    const stacked = [];
    let running = series.start.map(() => 0);
    for (const p of providers) {
      running = running.map((v, i) => v + p.values[i]);
      stacked.push(running);
    }
    const bars = uPlot.paths.bars({ size: [0.8, 48] });
    const seriesOptions = providers.map((p, i) => ({
      label: p.name, fill: COLORS[i % COLORS.length], stroke: COLORS[i % COLORS.length], width: 0, paths: bars,
      points: { show: false },
    })).reverse();
    drawChart("spend", $("chart-spend"), {
      legend: { show: false }, cursor: { drag: { x: false, y: false } },
      scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [{}, { size: 60, values: (u, ticks) => ticks.map(sats) }],
      series: [{}, ...seriesOptions],
    }, [series.start, ...stacked.reverse()]);
    const legend = $("spend-legend");
    legend.textContent = "";
    providers.forEach((p, i) => {
      const item = document.createElement("li");
      item.dataset.provider = p.name;
      const swatch = document.createElement("i");
      swatch.style.background = COLORS[i % COLORS.length];
      item.append(swatch, `${p.name}: ${sats(p.total)} sats`);
      legend.appendChild(item);
    });
    view.data.spend = Object.fromEntries(providers.map((p) => [p.name, p.values]));
  }

  function drawSaved(series) {
    const cumulative = (values) => { let sum = 0; return values.map((v) => (sum += Number(v))); };
    drawChart("saved", $("chart-saved"), {
      legend: { show: false }, cursor: { drag: { x: false, y: false } },
      scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [{}, { size: 60, values: (u, ticks) => ticks.map(sats) }],
      series: [{}, { label: "saved vs most expensive (cumulative)", stroke: "#12805c", width: 2, fill: "rgba(18,128,92,.08)", value: (u, v) => (v == null ? "–" : sats(v)) },
               { label: "saved vs next-best (cumulative)", stroke: "#f7931a", width: 2, value: (u, v) => (v == null ? "–" : sats(v)) }],
    }, [series.start, cumulative(series.saved_vs_most_expensive_sats), cumulative(series.saved_vs_next_best_sats)]);
  }

  function drawTotals(totals) {
    $("saved-next").textContent = sats(totals.saved_vs_next_best_sats);
    $("saved-max").textContent = sats(totals.saved_vs_most_expensive_sats);
    $("spent").textContent = sats(totals.cost_sats);
    $("requests").textContent = totals.requests.toLocaleString("en-US");
    $("errors").textContent = `${totals.errors} (${pctText(pct(totals.errors, totals.requests))})`;
  }

  function drawShares(element, groups, key, totals) {
    element.textContent = "";
    const totalCost = Number(totals.cost_sats);
    for (const group of [...groups].sort((a, b) => Number(b.cost_sats) - Number(a.cost_sats) || b.requests - a.requests)) {
      const row = document.createElement("div");
      row.className = "row";
      row.dataset.name = label(group[key]);
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = label(group[key]);
      const bars = document.createElement("span");
      bars.className = "bars";
      const requestShare = pct(group.requests, totals.requests);
      const spendShare = pct(Number(group.cost_sats), totalCost);
      for (const [share, kind] of [[requestShare, "bar req"], [spendShare, "bar"]]) {
        const bar = document.createElement("span");
        bar.className = kind;
        bar.style.width = share + "%";
        bars.appendChild(bar);
      }
      const nums = document.createElement("span");
      nums.className = "nums";
      nums.textContent = `${pctText(requestShare)} of requests (${group.requests}), ${pctText(spendShare)} of spend (${sats(group.cost_sats)} sats)`;
      row.append(name, bars, nums);
      element.appendChild(row);
    }
  }

  function drawPerProvider(groups) {
    const body = $("per-provider").tBodies[0];
    body.textContent = "";
    for (const g of groups) {
      const row = body.insertRow();
      row.dataset.provider = label(g.provider);
      cell(row, label(g.provider));
      cell(row, String(g.requests));
      const rate = pct(g.errors, g.requests);
      cell(row, pctText(rate), rate > 0 ? "err" : "");
      cell(row, ms(g.latency_ms.p50));
      cell(row, ms(g.latency_ms.p95));
      cell(row, ms(g.ttft_ms.p50));
      cell(row, ms(g.ttft_ms.p95));
      const estimate = g.estimate_vs_actual;
      cell(row, estimate.requests ? sats(estimate.estimated_sats) : "–");
      cell(row, estimate.requests ? sats(estimate.actual_sats) : "–");
      const ratio = Number(estimate.actual_sats) / Number(estimate.estimated_sats);
      cell(row, estimate.requests && Number.isFinite(ratio) ? ratio.toFixed(2) + "×" : "–");
    }
  }

  function drawHealth(health, balances) {
    const body = $("health").tBodies[0];
    body.textContent = "";
    const known = Object.fromEntries(balances.providers.map((b) => [b.name, b]));
    $("wallet").textContent = balances.wallet ? `wallet: ${sats(balances.wallet.spendable_sats)} sats spendable` : "";
    for (const p of health.providers) {
      const row = body.insertRow();
      row.dataset.provider = p.name;
      cell(row, p.name);
      const state = document.createElement("span");
      state.className = "state " + p.state;
      state.textContent = p.state.replace("_", " ");
      row.insertCell().appendChild(state);
      const balance = known[p.name];
      const shown = cell(row, balance && balance.balance_sats != null ? sats(balance.balance_sats) + " sats" : "unknown");
      shown.className = "balance";
      if (balance && balance.errors.length) shown.title = balance.errors.join("; ");
      const charges = p.charges;
      const checked = cell(row, charges.checked ? `${charges.overcharged} of ${charges.checked}` +
        (charges.standing === "ok" ? "" : ` (${charges.standing})`) : "–", charges.standing === "ok" ? "" : "err");
      checked.classList.add("charges");
      if (charges.overcharged) checked.title = `${sats(charges.overcharged_msats / 1000)} sats billed above the advertised prices`;
      cell(row, p.last_error || "", p.last_error ? "err" : "");
    }
  }

  function fillFilters(models, groups) {
    const known = {
      model: models.data.map((m) => m.id),
      provider: [...new Set(models.data.flatMap((m) => m.providers.map((p) => p.name)))],
      policy: groups.policy.map((g) => g.policy),
    };
    for (const name of FILTERS) {
      const select = $("f-" + name);
      const values = [...new Set([...known[name], view[name]].filter(Boolean))].sort();
      const current = [...select.options].slice(1).map((o) => o.value);
      if (values.join("\n") === current.join("\n")) continue;
      select.length = 1;
      for (const value of values) select.add(new Option(value, value, false, value === view[name]));
    }
  }

  async function refreshSummary() {
    const bucket = BUCKET_FOR_RANGE[view.range];
    const [stats, byProvider, byModel, byPolicy, health, models, balances] = await Promise.all([
      get("/v1/stats?" + query({ bucket })),
      get("/v1/stats?" + query({ group_by: "provider" })),
      get("/v1/stats?" + query({ group_by: "model" })),
      get("/v1/stats?" + query({ group_by: "policy" })),
      get("/health", [200, 503]),
      get("/v1/models"),
      get("/v1/balances"),
    ]);
    view.data.stats = stats;
    view.data.groups = { provider: byProvider.groups, model: byModel.groups, policy: byPolicy.groups };
    const empty = stats.totals.requests === 0;
    $("empty").hidden = !empty;
    for (const section of document.querySelectorAll("main > section.card")) {
      section.hidden = empty && !section.contains($("health"));
    }
    drawHealth(health, balances);
    fillFilters(models, view.data.groups);
    view.data.spend = {};
    if (!empty) {
      drawTotals(stats.totals);
      drawSpend(stats.series);
      drawSaved(stats.series);
      drawShares($("share-provider"), byProvider.groups, "provider", stats.totals);
      drawShares($("share-model"), byModel.groups, "model", stats.totals);
      drawShares($("share-policy"), byPolicy.groups, "policy", stats.totals);
      drawPerProvider(byProvider.groups);
    }
  }

  async function refreshLatest() {
    const page = await get("/v1/requests?" + query({ limit: "15" }));
    const body = $("latest").tBodies[0];
    body.textContent = "";
    const first = view.seen.size === 0;
    for (const r of page.data) {
      const row = body.insertRow();
      row.dataset.requestId = r.request_id;
      if (!first && !view.seen.has(r.request_id)) row.className = "fresh";
      view.seen.add(r.request_id);
      cell(row, new Date(r.timestamp).toLocaleTimeString());
      cell(row, r.policy);
      cell(row, r.model);
      cell(row, r.provider || "–");
      cell(row, `${r.input_tokens ?? "–"}${r.usage_estimated ? "~" : ""} / ${r.output_tokens ?? "–"}`);
      cell(row, r.cost_sats == null ? "–" : sats(r.cost_sats));
      cell(row, ms(r.latency_ms));
      const failed = r.attempts && r.attempts !== "none" ? ` (after ${r.attempts})` : "";
      cell(row, (r.success ? "ok" : r.error || `HTTP ${r.status_code}`) + failed, r.success ? "" : "err");
    }
    return page;
  }

  function report(error) {
    $("problem").hidden = !error;
    $("problem").textContent = error ? "Could not read arbstr's API: " + error.message : "";
    $("status").textContent = error ? "update failed" : "updated " + new Date().toLocaleTimeString();
  }

  async function refresh(what) {
    try {
      await what();
      report(null);
    } catch (error) {
      report(error);
    }
  }

  let summaryTimer = null;
  async function refreshAll() {
    clearTimeout(summaryTimer);
    await Promise.all([refresh(refreshSummary), refresh(refreshLatest)]);
    view.ready = true;
    document.body.dataset.ready = view.range;
    summaryTimer = setTimeout(refreshAll, SUMMARY_EVERY_MS);
  }

  function start() {
    $("base-url").textContent = window.location.origin + "/v1";
    for (const button of document.querySelectorAll("#ranges button")) {
      button.addEventListener("click", () => {
        view.range = button.dataset.range;
        for (const other of document.querySelectorAll("#ranges button")) other.classList.toggle("on", other === button);
        document.body.dataset.ready = "";
        refreshAll();
      });
    }
    for (const name of FILTERS) {
      $("f-" + name).addEventListener("change", (event) => {
        view[name] = event.target.value;
        document.body.dataset.ready = "";
        refreshAll();
      });
    }
    resizing.observe(document.querySelector("main"));
    refreshAll();
    setInterval(() => refresh(refreshLatest), LIVE_EVERY_MS);
  }

  start();
})();
