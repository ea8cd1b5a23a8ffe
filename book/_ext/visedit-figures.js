// Draws the book's plotly figures (written by visedit's "visedit_book" renderer as a div plus the figure's
// JSON) with the site's shared plotly.js, each when it comes near the screen; all of them before printing.
// Grids of panels marked by visedit.viz.figures.reflowing (galleries, heatmap grids) reflow: they get as
// many columns as their width holds, and are laid out again when the width changes.
(function () {
  // The relayout (plotly attribute strings) that gives a reflowing grid `width` px, or null for others.
  function reflow(layout, width) {
    var m = layout.meta && layout.meta.visedit_reflow;
    if (!m) return null;
    var margin = layout.margin || {};
    var plotW = Math.max(1, width - (margin.l || 0) - (margin.r || 0));
    var cols = Math.max(1, Math.min(m.cols, Math.floor(plotW / (0.8 * m.cell))));
    var rows = Math.ceil(m.n / cols);
    var TITLE = 6 + 14 * (m.lines || 1);  // px above each panel for its title
    var rowH = Math.min(m.cell, plotW / cols) + TITLE;
    var plotH = rows * rowH;
    var out = {height: Math.round(plotH + (margin.t || 0) + (margin.b || 0))};
    for (var k = 0; k < m.n; k++) {
      var r = Math.floor(k / cols), c = k % cols, s = k ? String(k + 1) : "";
      var top = 1 - (r * rowH + TITLE) / plotH, bottom = 1 - (r + 1) * rowH / plotH;
      out["xaxis" + s + ".domain"] = [(c + 0.01) / cols, (c + 0.99) / cols];
      out["yaxis" + s + ".domain"] = [Math.max(0, bottom), Math.max(0, top)];
      var a = m.titles ? m.titles[k] : -1;
      if (a >= 0) {
        out["annotations[" + a + "].x"] = (c + 0.5) / cols;
        out["annotations[" + a + "].y"] = top;
        out["annotations[" + a + "].yanchor"] = "bottom";
      }
    }
    return {cols: cols, update: out};
  }

  function assign(layout, update) {
    Object.keys(update).forEach(function (key) {
      var parts = key.replace(/\[(\d+)\]/g, ".$1").split("."), o = layout;
      for (var i = 0; i < parts.length - 1; i++) o = o[parts[i]] = o[parts[i]] || {};
      o[parts[parts.length - 1]] = update[key];
    });
  }

  function draw(holder) {
    if (holder.dataset.drawn) return;
    holder.dataset.drawn = "1";
    var spec = JSON.parse(document.querySelector('script[data-visedit-figure="' + holder.id + '"]').textContent);
    var grid = reflow(spec.layout || {}, holder.clientWidth);
    if (grid) {
      assign(spec.layout, grid.update);
      holder.style.height = grid.update.height + "px";
      holder.dataset.reflow = String(grid.cols);
    }
    Plotly.newPlot(holder, spec);
  }

  function relayoutAll() {
    document.querySelectorAll(".plotly-graph-div[data-reflow]").forEach(function (holder) {
      if (!holder._fullLayout) return;
      var grid = reflow(holder.layout, holder.clientWidth);
      holder.style.height = grid.update.height + "px";
      holder.dataset.reflow = String(grid.cols);
      Plotly.relayout(holder, grid.update);
    });
  }

  function start() {
    var holders = Array.prototype.slice.call(document.querySelectorAll(".plotly-graph-div[data-visedit-figure]"));
    window.addEventListener("beforeprint", function () { holders.forEach(draw); });
    var pending = null;
    window.addEventListener("resize", function () { clearTimeout(pending); pending = setTimeout(relayoutAll, 150); });
    if (!("IntersectionObserver" in window)) { holders.forEach(draw); return; }
    var near = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { near.unobserve(e.target); draw(e.target); } });
    }, {rootMargin: "800px 0px"});
    holders.forEach(function (h) { near.observe(h); });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
