// itda_lens dashboard: a static single-page app. Data arrives as JS files (data/index.js,
// data/shard_NNNNN.js) that call DASH.setIndex / DASH.addShard, so the site opens from disk.
"use strict";

const DASH = {
  index: null,
  shards: {},
  waiting: {},
  setIndex(data) { this.index = data; start(); },
  addShard(n, items) {
    this.shards[n] = items;
    (this.waiting[n] || []).forEach((f) => f(items));
    delete this.waiting[n];
  },
  shard(n, done) {
    if (this.shards[n]) return done(this.shards[n]);
    if (this.waiting[n]) return this.waiting[n].push(done);
    this.waiting[n] = [done];
    const s = document.createElement("script");
    s.src = "data/shard_" + String(n).padStart(5, "0") + ".js";
    s.onerror = () => showError("could not load " + s.src);
    document.body.appendChild(s);
  },
};
window.DASH = DASH;

const state = { query: "", sort: "freq", asc: false, shown: 100 };

function showError(msg) {
  const box = document.getElementById("error");
  box.hidden = false;
  box.textContent += msg + "\n";
}
window.addEventListener("error", (e) => showError("error: " + e.message));

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fmt(x, digits = 3) {
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1000 || a < 0.001) return x.toExponential(2);
  return x.toPrecision(digits);
}

function tokText(id) {
  const v = DASH.index.vocab;
  return id >= 0 && id < v.length ? v[id] : "<" + id + ">";
}

function shown(id) {
  return JSON.stringify(tokText(id)).slice(1, -1);
}

function start() {
  const m = DASH.index.meta;
  document.getElementById("subtitle").textContent =
    `${m.architecture} · ${m.model || "model"} · ${m.hook}${m.hook_out ? " \u2192 " + m.hook_out : ""} · ` +
    `${m.d_sae.toLocaleString()} latents · ` +
    `${m.n_tokens.toLocaleString()} tokens${m.data ? " of " + m.data : ""}`;
  window.addEventListener("hashchange", route);
  route();
}

function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const m = h.match(/^latent\/(\d+)/);
  if (m) renderLatent(parseInt(m[1], 10));
  else renderIndex();
}

// --- index ---------------------------------------------------------------------------------

function rows() {
  const d = DASH.index;
  const q = state.query.trim().toLowerCase();
  let ids = [...Array(d.meta.d_sae).keys()];
  if (q.startsWith("#") && /^#\d+$/.test(q)) ids = ids.filter((i) => String(i) === q.slice(1));
  else if (q) ids = ids.filter((i) => d.label[i] >= 0 && tokText(d.label[i]).toLowerCase().includes(q));
  const key = { id: (i) => i, freq: (i) => d.freq[i], mean: (i) => d.mean_abs[i], max: (i) => d.max_abs[i],
    label: (i) => tokText(d.label[i]) }[state.sort];
  ids.sort((a, b) => {
    const x = key(a), y = key(b);
    const c = x < y ? -1 : x > y ? 1 : a - b;
    return state.asc ? c : -c;
  });
  return ids;
}

function histogramSvg(values, opts) {
  const { bins, lo, hi, width = 560, height = 140, xlabel, colors } = opts;
  const counts = values;
  const max = Math.max(1, ...counts);
  const bw = (width - 40) / bins;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height + 30}`);
  svg.setAttribute("width", "100%");
  svg.style.maxWidth = width + "px";
  counts.forEach((c, i) => {
    const r = document.createElementNS(svg.namespaceURI, "rect");
    const h = (c / max) * height;
    r.setAttribute("x", 30 + i * bw);
    r.setAttribute("y", height - h + 5);
    r.setAttribute("width", Math.max(1, bw - 1));
    r.setAttribute("height", h);
    r.setAttribute("fill", colors ? colors(i) : "#4a78b5");
    const t = document.createElementNS(svg.namespaceURI, "title");
    t.textContent = c.toLocaleString();
    r.appendChild(t);
    svg.appendChild(r);
  });
  const label = (x, y, s, anchor) => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", y);
    t.setAttribute("text-anchor", anchor || "middle");
    t.textContent = s;
    svg.appendChild(t);
  };
  label(30, height + 18, lo, "start");
  label(width - 10, height + 18, hi, "end");
  label(width / 2, height + 28, xlabel);
  label(2, 12, max.toLocaleString(), "start");
  return svg;
}

function freqHistogram() {
  const d = DASH.index;
  const logs = d.freq.filter((f) => f > 0).map((f) => Math.log10(f));
  const dead = d.freq.length - logs.length;
  const lo = Math.floor(Math.min(...logs, -1)), hi = 0;
  const bins = 40;
  const counts = new Array(bins).fill(0);
  logs.forEach((v) => { counts[Math.min(bins - 1, Math.floor(((v - lo) / (hi - lo)) * bins))] += 1; });
  return el("div", {},
    el("h3", {}, "Firing frequency (log10 of the fraction of tokens), all latents"),
    histogramSvg(counts, { bins, lo: "1e" + lo, hi: "1", xlabel: "log10 frequency" }),
    el("p", { class: "note" }, `${dead.toLocaleString()} latents never fired on these tokens.`));
}

function renderIndex() {
  const d = DASH.index;
  const view = document.getElementById("view");
  view.replaceChildren();
  const m = d.meta;
  const ids = rows();
  const search = el("input", { type: "search", id: "search", placeholder: "search tokens, or #id",
    value: state.query });
  search.addEventListener("input", () => { state.query = search.value; state.shown = 100; refresh(); });
  const head = el("tr", {});
  const cols = [["id", "latent"], ["label", m.label_kind], ["freq", "frequency"], ["mean", "mean |act|"],
    ["max", "max |act|"]];
  for (const [key, name] of cols) {
    const th = el("th", { "data-key": key }, name);
    if (state.sort === key) th.className = "sorted" + (state.asc ? " asc" : "");
    th.addEventListener("click", () => {
      state.asc = state.sort === key ? !state.asc : key === "id" || key === "label";
      state.sort = key;
      renderIndex();
    });
    head.appendChild(th);
  }
  const body = el("tbody", { id: "rows" });
  const table = el("table", { id: "latents" }, el("thead", {}, head), body);
  const more = el("button", { id: "more" }, "show more");
  more.addEventListener("click", () => { state.shown += 200; refresh(); });
  const count = el("p", { class: "muted", id: "count" });
  function refresh() {
    const ids = rows();
    body.replaceChildren(...ids.slice(0, state.shown).map((i) =>
      el("tr", { class: "row", "data-latent": i, onclick: () => { location.hash = "#/latent/" + i; } },
        el("td", { class: "num" }, i),
        el("td", {}, d.label[i] >= 0 ? "\u201c" + shown(d.label[i]) + "\u201d" : "-"),
        el("td", { class: "num" }, fmt(d.freq[i])),
        el("td", { class: "num" }, fmt(d.mean_abs[i])),
        el("td", { class: "num" }, fmt(d.max_abs[i])))));
    count.textContent = `${ids.length.toLocaleString()} latents match; showing ${Math.min(ids.length, state.shown)}.`;
    more.hidden = ids.length <= state.shown;
  }
  view.append(
    el("div", { class: "cards" },
      el("div", { class: "card" }, el("b", {}, m.d_sae.toLocaleString()), "latents"),
      el("div", { class: "card" }, el("b", {}, d.freq.filter((f) => f > 0).length.toLocaleString()), "fired"),
      el("div", { class: "card" }, el("b", {}, m.n_tokens.toLocaleString()), "tokens read")),
    ...(m.is_transcoder ? [el("p", { class: "note", id: "sides" },
      `A transcoder: each latent is read at its input hook ${m.hook} (contexts, frequencies and ` +
      `activations here are its codes there) and writes its output atom at ${m.hook_out} ` +
      "(promoted and suppressed tokens on its page).")] : []),
    freqHistogram(),
    el("h3", {}, "Latents"),
    search, count, table, more);
  refresh();
  if (ids.length === 0) count.textContent = "no latent matches";
}

// --- one latent ------------------------------------------------------------------------------

function color(a, scale) {
  if (!scale || !a) return "transparent";
  const t = Math.min(1, Math.abs(a) / scale);
  return a > 0 ? `rgba(230, 110, 30, ${0.12 + 0.78 * t})` : `rgba(40, 110, 220, ${0.12 + 0.78 * t})`;
}

function context(c, scale, label) {
  const div = el("div", { class: "ctx" }, el("span", { class: "val" }, label));
  c.t.forEach((id, j) => {
    const a = c.a ? c.a[j] : 0;
    const span = el("span", { class: "tok" + (j === c.c ? " center" : ""),
      title: `${JSON.stringify(tokText(id))} ${c.a ? "act " + fmt(a) : ""}` }, tokText(id));
    span.style.background = c.a ? color(a, scale) : (j === c.c ? "#ffe9a8" : "transparent");
    div.appendChild(span);
  });
  return div;
}

function signedHistogram(h) {
  const counts = h.neg.concat(h.pos);
  const bins = counts.length;
  return histogramSvg(counts, { bins, lo: fmt(-h.max), hi: fmt(h.max), xlabel: "activation",
    width: 420, height: 110, colors: (i) => (i < bins / 2 ? "#4a78b5" : "#e06e1e") });
}

function tokenPills(list, cls) {
  return el("div", { class: "tokens", id: cls }, ...list.map(([id, v]) =>
    el("span", { class: "pill " + cls, title: fmt(v) }, `${shown(id)} ${v > 0 ? "+" : ""}${fmt(v)}`)));
}

function renderLatent(i) {
  const d = DASH.index;
  const view = document.getElementById("view");
  if (!(i >= 0 && i < d.meta.d_sae)) {
    view.replaceChildren(el("p", {}, `No latent ${i}: this dictionary has ${d.meta.d_sae}.`));
    return;
  }
  view.replaceChildren(el("p", { class: "muted" }, "Loading latent " + i + "…"));
  DASH.shard(Math.floor(i / d.meta.shard), (items) => {
    const it = items[i % d.meta.shard];
    const scale = d.max_abs[i];
    const left = el("div", {});
    const right = el("div", {});
    const tc = d.meta.is_transcoder;
    if (it.src) {
      const what = tc ? `the atom's pair (input at ${d.meta.hook}, output at ${d.meta.hook_out}) was read`
        : "read";
      left.append(el("h3", {}, `Provenance: ${what} at sequence ${it.src.s}, position ${it.src.p} of the build stream`),
        el("div", { id: "provenance" }, context(it.src, 0, "atom")));
    } else if (d.meta.is_itda) {
      left.append(el("h3", {}, "Provenance"), el("p", { class: "note" },
        "The build stream was not available: own token \u201c" + shown(d.label[i]) + "\u201d."));
    }
    const where = tc ? ` at the input hook ${d.meta.hook}` : "";
    left.append(el("h3", {}, `Top activations${where} (of ${d.meta.n_tokens.toLocaleString()} held-out tokens)`));
    const top = el("div", { id: "top" });
    if (!it.top.length) top.append(el("p", { class: "muted" }, "Never fired on these tokens."));
    it.top.forEach((c) => top.append(context(c, scale, fmt(c.v))));
    left.append(top);
    if (it.low.length) {
      left.append(el("h3", {}, "Lower activations (a uniform sample of firings, lower half; q = quantile)"));
      const low = el("div", { id: "low" });
      it.low.forEach((c) => low.append(context(c, scale, `${fmt(c.v)} q${c.q.toFixed(2)}`)));
      left.append(low);
    }
    right.append(el("h3", {}, "Activation histogram"), signedHistogram(it.hist));
    const side = tc ? ` by the output atom (at ${d.meta.hook_out})` : "";
    if (it.up) {
      right.append(el("h3", {}, "Promoted tokens" + side), tokenPills(it.up, "up"),
        el("h3", {}, "Suppressed tokens" + side), tokenPills(it.down, "down"),
        el("p", { class: "note" }, d.meta.logit_note));
    } else if (d.meta.no_logits) {
      right.append(el("p", { class: "note", id: "no-logits" }, d.meta.no_logits));
    }
    right.append(el("h3", {}, "Co-fires with (Jaccard)"));
    const co = el("div", { id: "cofire" });
    if (!it.co.length) co.append(el("p", { class: "muted" }, "no co-firing latent"));
    it.co.forEach(([j, s]) => co.append(el("div", {},
      el("a", { href: "#/latent/" + j }, "latent " + j),
      ` \u201c${d.label[j] >= 0 ? shown(d.label[j]) : "-"}\u201d  ${s.toFixed(3)}`)));
    right.append(co, el("p", { class: "note" },
      `Counted over the first ${d.meta.cofire_tokens.toLocaleString()} tokens.`));
    view.replaceChildren(
      el("p", {}, el("a", { href: "#/" }, "\u2190 all latents")),
      el("h2", { id: "title" }, `Latent ${i}` + (d.label[i] >= 0 ? ` \u2014 ${d.meta.label_kind} \u201c${shown(d.label[i])}\u201d` : "")),
      el("div", { class: "cards" },
        el("div", { class: "card" }, el("b", {}, fmt(d.freq[i])), "frequency"),
        el("div", { class: "card" }, el("b", {}, fmt(d.mean_abs[i])), "mean |act| when firing"),
        el("div", { class: "card" }, el("b", {}, fmt(d.max_abs[i])), "max |act|")),
      el("div", { class: "grid" }, left, right));
  });
}
