// Draws the book's plotly figures (written by visedit's "visedit_book" renderer as a div plus the figure's
// JSON) with the site's shared plotly.js, each when it comes near the screen; all of them before printing.
(function () {
  function draw(holder) {
    if (holder.dataset.drawn) return;
    holder.dataset.drawn = "1";
    var spec = document.querySelector('script[data-visedit-figure="' + holder.id + '"]');
    Plotly.newPlot(holder, JSON.parse(spec.textContent));
  }
  function start() {
    var holders = Array.prototype.slice.call(document.querySelectorAll(".plotly-graph-div[data-visedit-figure]"));
    window.addEventListener("beforeprint", function () { holders.forEach(draw); });
    if (!("IntersectionObserver" in window)) { holders.forEach(draw); return; }
    var near = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { near.unobserve(e.target); draw(e.target); } });
    }, {rootMargin: "800px 0px"});
    holders.forEach(function (h) { near.observe(h); });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
