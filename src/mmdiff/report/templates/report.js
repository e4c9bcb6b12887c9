/* The report's only script, written into the page (no network, no library): sortable and
   filterable tables, and the feature browser, whose cards are drawn from the JSON
   element #feature-data. Every piece of data is set with textContent,
   never as HTML. */
(function () {
  "use strict";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // ---------------------------------------------------------------- tables: sort and filter
  function cellKey(td) {
    var t = td.getAttribute("data-v");
    if (t === null) t = td.textContent.trim();
    var m = t.replace(/\u2212/g, "-").replace(/,/g, "").match(/^[^0-9+\-.]{0,3}([+\-]?\d*\.?\d+(?:e[+\-]?\d+)?)/i);
    return m ? { n: parseFloat(m[1]), s: t.toLowerCase() } : { n: NaN, s: t.toLowerCase() };
  }

  function sortTable(table, col, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var dir = th.getAttribute("aria-sort") === "descending" ? 1 : -1;
    var keyed = rows.map(function (r, i) { return { r: r, i: i, k: cellKey(r.cells[col] || r.cells[0]) }; });
    keyed.sort(function (a, b) {
      var x = a.k, y = b.k, c;
      if (!isNaN(x.n) && !isNaN(y.n)) c = x.n - y.n;
      else if (!isNaN(x.n)) c = -1;
      else if (!isNaN(y.n)) c = 1;
      else c = x.s < y.s ? -1 : x.s > y.s ? 1 : 0;
      return c * dir || a.i - b.i;
    });
    keyed.forEach(function (k) { body.appendChild(k.r); });
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    if (!table.tHead || !table.tBodies.length) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "sort by this column";
      th.addEventListener("click", function () { sortTable(table, col, th); });
      th.addEventListener("keydown", function (ev) { if (ev.key === "Enter") sortTable(table, col, th); });
    });
  });

  Array.prototype.forEach.call(document.querySelectorAll("input.filter"), function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var count = document.getElementById(input.getAttribute("data-table") + "-count");
    if (!table) return;
    input.addEventListener("input", function () {
      var q = input.value.trim().toLowerCase(), shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        var hit = !q || r.textContent.toLowerCase().indexOf(q) >= 0;
        r.hidden = !hit;
        shown += hit ? 1 : 0;
      });
      if (count) count.textContent = shown + " of " + table.tBodies[0].rows.length + " rows";
    });
  });

  // ---------------------------------------------------------------- the feature browser
  var source = document.getElementById("feature-data");
  var browser = document.getElementById("browser");
  if (!source || !browser) return;
  var data = JSON.parse(source.textContent);
  var features = data.features || [];
  var byId = {};
  features.forEach(function (f) { byId[f.id] = f; });
  var search = document.getElementById("feature-search");
  var list = document.getElementById("feature-list");
  var card = document.getElementById("feature-card");
  var MAX_LIST = 40;

  function haystack(f) {
    if (!f._text) {
      f._text = [f.id, (f.tasks || []).join(" "), f.explanation ? f.explanation.description : "",
        (f.heads || []).map(function (h) { return h[0]; }).join(" ")].join(" ").toLowerCase();
    }
    return f._text;
  }

  function showList() {
    var q = search.value.trim().toLowerCase();
    var terms = q ? q.split(/\s+/) : [];
    var hits = features.filter(function (f) {
      var h = haystack(f);
      return terms.every(function (t) { return h.indexOf(t) >= 0; });
    });
    list.textContent = "";
    hits.slice(0, MAX_LIST).forEach(function (f) {
      var b = el("button", "pick");
      b.type = "button";
      b.setAttribute("data-id", f.id);
      b.appendChild(el("strong", null, f.id));
      b.appendChild(el("span", "muted", " " + (f.tasks || []).join(", ")));
      if (f.explanation) b.appendChild(el("span", "desc", " " + f.explanation.description));
      b.addEventListener("click", function () { open(f); });
      list.appendChild(b);
    });
    var more = hits.length - Math.min(hits.length, MAX_LIST);
    document.getElementById("feature-count").textContent =
      hits.length + " of " + features.length + " features" + (more > 0 ? " (first " + MAX_LIST + " listed; type to narrow)" : "");
  }

  function kv(rows) {
    var d = el("div", "kv");
    rows.forEach(function (r) {
      var chip = el("span", "chip");
      chip.appendChild(el("span", "muted", r[0] + " "));
      chip.appendChild(el("span", null, r[1]));
      d.appendChild(chip);
    });
    return d;
  }

  function grid(columns, rows) {
    var t = el("table", "compact");
    var h = el("thead"), hr = el("tr");
    columns.forEach(function (c) { hr.appendChild(el("th", null, c)); });
    h.appendChild(hr);
    t.appendChild(h);
    var b = el("tbody");
    rows.forEach(function (r) {
      var tr = el("tr");
      r.forEach(function (v) { tr.appendChild(el("td", null, v)); });
      b.appendChild(tr);
    });
    t.appendChild(b);
    return t;
  }

  function tokens(ex) {
    var box = el("div", "tokens");
    var peak = 0;
    ex.tokens.forEach(function (t) { if (t[2] !== "s" && t[1] > peak) peak = t[1]; });
    ex.tokens.forEach(function (t) {
      var text = t[0], a = t[1], kind = t[2];
      var s = el("span", "tok " + (kind === "i" ? "img" : kind === "s" ? "special" : "text"));
      s.appendChild(el("span", "w", text.trim() === "" ? "\u2423" : text.trim()));
      var share = peak > 0 ? Math.max(0, a) / peak : 0;
      if (kind !== "s") s.style.backgroundColor = "rgba(230, 90, 0, " + (share * 0.85).toFixed(2) + ")";
      if (kind !== "s" && share >= 0.1) s.appendChild(el("sub", "act", a.toPrecision(2)));
      s.title = "activation " + a;
      box.appendChild(s);
    });
    return box;
  }

  function section(title) {
    var d = el("div", "card-part");
    d.appendChild(el("h4", null, title));
    return d;
  }

  function render(f) {
    card.textContent = "";
    var head = el("div", "card-head");
    head.appendChild(el("h3", null, "Feature " + f.id));
    (f.tasks || []).forEach(function (t) { head.appendChild(el("span", "tag", t)); });
    if (f.image_share !== undefined && f.image_share !== null)
      head.appendChild(el("span", "muted", " " + Math.round(100 * f.image_share) + "% of its activation on image tokens"));
    card.appendChild(head);
    var cols = el("div", "card-cols");
    var left = el("div", "card-left"), right = el("div", "card-right");
    cols.appendChild(left);
    cols.appendChild(right);
    card.appendChild(cols);

    var ex = section("Explanation");
    if (f.explanation) {
      ex.appendChild(el("p", "desc-big", f.explanation.description));
      ex.appendChild(el("p", "muted", f.explanation.score || "no held-out detection score measured"));
      if (f.explanation.grounded) ex.appendChild(el("p", "grounded", "Grounded: " + f.explanation.grounded));
    } else ex.appendChild(el("p", "muted", "No explanation (the interp stage did not explain this feature)."));
    left.appendChild(ex);

    var sel = section("Scores that selected it");
    (f.scores || []).forEach(function (s) {
      sel.appendChild(el("div", "muted", s.table));
      sel.appendChild(kv(s.rows));
    });
    if (!(f.scores || []).length) sel.appendChild(el("p", "muted", "No selection table holds it."));
    left.appendChild(sel);

    var hs = section("Attribution heads (top by |score|)");
    if ((f.heads || []).length) hs.appendChild(grid(["head", "score"], f.heads));
    else hs.appendChild(el("p", "muted", "Not attributed (the attribution stage scores the top features only)."));
    left.appendChild(hs);

    var ef = section("Removing its task set");
    if ((f.effects || []).length) ef.appendChild(grid(["set", "eval task", "effect [95% CI]", "beyond random [95% CI]"], f.effects));
    else ef.appendChild(el("p", "muted", "In no removed set."));
    left.appendChild(ef);

    var xs = section("Top activating examples");
    if (!(f.examples || []).length) xs.appendChild(el("p", "muted", f.no_examples || "No stored examples."));
    (f.examples || []).forEach(function (e) {
      var box = el("div", "example");
      var body = el("div", "ex-body");
      body.appendChild(el("div", "muted", (e.source || "examples") + " \u00b7 record " + e.record + " \u00b7 max activation " + e.max));
      if (e.question) body.appendChild(el("div", "question", e.question));
      body.appendChild(tokens(e));
      box.appendChild(body);
      if (e.heatmap) {
        var img = el("img", "heat");
        img.alt = "image-patch heatmap of record " + e.record;
        img.src = "data:image/png;base64," + e.heatmap;
        box.appendChild(img);
      }
      xs.appendChild(box);
    });
    if (f.dashboard) {
      var a = el("a", null, "full dashboard (separate file)");
      a.href = f.dashboard;
      xs.appendChild(a);
    }
    right.appendChild(xs);
  }

  function open(f) {  // drawn at once; the address names the card, so it can be linked
    history.pushState(null, "", "#f-" + f.id.replace("/", "-"));
    render(f);
    browser.scrollIntoView();
  }

  function fromHash() {
    var m = /^#f-L(\d+)-F(\d+)$/.exec(location.hash);
    if (!m) return;
    var f = byId["L" + m[1] + "/F" + m[2]];
    if (!f) return;
    render(f);
    browser.scrollIntoView();
  }

  search.addEventListener("input", showList);
  window.addEventListener("hashchange", fromHash);
  showList();
  if (/^#f-/.test(location.hash)) fromHash();
  else if (features.length) render(features[0]);
})();
