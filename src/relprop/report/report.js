"use strict";
(function () {
  // Sortable tables: click a heading; numbers sort numerically, empty cells last.
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("th").forEach(function (th, column) {
      th.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var numeric = th.dataset.type === "number";
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
          if (numeric) {
            if (x === "" || y === "") { return (x === "") - (y === ""); }
            x = parseFloat(x); y = parseFloat(y);
          }
          var order = x < y ? -1 : x > y ? 1 : 0;
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });

  // Gallery: built page by page from JSON, text only through textContent.
  var data = JSON.parse(document.getElementById("gallery-data").textContent);
  var rows = data.rows.slice(), page = 0, size = data.pageSize;
  var gallery = document.getElementById("gallery");
  var sort = document.getElementById("sort");
  function option(value, text) {
    var o = document.createElement("option"); o.value = value; o.textContent = text; sort.appendChild(o);
  }
  option("", "run order");
  data.methods.forEach(function (m) {
    option("desc:" + m, "ID of " + m + ", best first");
    option("asc:" + m, "ID of " + m + ", worst first");
  });
  function cell(parts) {
    var div = document.createElement("div"); div.className = "cell";
    parts.forEach(function (p) { div.appendChild(p); });
    return div;
  }
  function text(tag, value, cls) {
    var el = document.createElement(tag); el.textContent = value; if (cls) { el.className = cls; }
    return el;
  }
  function caption(path) {  // break long paths after a slash, not inside a name
    var div = document.createElement("div"); div.className = "caption";
    path.split("/").forEach(function (part, i) {
      if (i > 0) { div.appendChild(document.createTextNode("/")); div.appendChild(document.createElement("wbr")); }
      div.appendChild(document.createTextNode(part));
    });
    return div;
  }
  function picture(src, alt) {
    if (!src) { return text("div", "no map", "empty"); }
    var img = document.createElement("img");
    img.src = src; img.alt = alt; img.loading = "lazy"; img.decoding = "async";
    return img;
  }
  function fmt(v) { return v === null || v === undefined ? "–" : v.toFixed(3); }
  function render() {
    var pages = Math.max(1, Math.ceil(rows.length / size));
    page = Math.min(Math.max(page, 0), pages - 1);
    gallery.textContent = "";
    var head = document.createElement("div"); head.className = "row head";
    head.appendChild(cell([text("span", "image")]));
    data.methods.forEach(function (m) { head.appendChild(cell([text("span", m)])); });
    gallery.appendChild(head);
    rows.slice(page * size, (page + 1) * size).forEach(function (r) {
      var line = document.createElement("div"); line.className = "row";
      line.appendChild(cell([
        r.orig ? picture(r.orig, r.image) : text("div", "original not found", "empty"),
        caption(r.image),
        text("div", "label: " + r.label), text("div", "pred: " + r.pred)]));
      data.methods.forEach(function (m) {
        var c = r.cells[m];
        if (!c) { line.appendChild(cell([text("div", "–", "empty")])); return; }
        var score = text("div", "ID " + fmt(c.id));
        score.title = "insertion " + fmt(c.ins) + ", deletion " + fmt(c.del);
        line.appendChild(cell([picture(c.src, m + " map of " + r.image), score]));
      });
      gallery.appendChild(line);
    });
    document.getElementById("page-info").textContent =
      "page " + (page + 1) + " of " + pages + " (" + rows.length + " images)";
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = page >= pages - 1;
  }
  function id(r, m) { var c = r.cells[m]; return c && c.id !== null ? c.id : null; }
  sort.addEventListener("change", function () {
    var parts = sort.value.split(":"), way = parts[0], m = parts.slice(1).join(":");
    rows = data.rows.slice();
    if (m) {
      rows.sort(function (a, b) {
        var x = id(a, m), y = id(b, m);
        if (x === null || y === null) { return (x === null) - (y === null); }
        return way === "asc" ? x - y : y - x;
      });
    }
    page = 0; render();
  });
  document.getElementById("prev").addEventListener("click", function () { page -= 1; render(); });
  document.getElementById("next").addEventListener("click", function () { page += 1; render(); });
  render();
})();
