// Charts drawn as SVG from the data, with no library: lines over time, a heatmap, a scatter.
// Each is an image with a label for screen readers; the numbers are in the page's tables too.
import { h, fmt } from "./app.js";

const W = 560, H = 180, PAD = { left: 56, right: 12, top: 12, bottom: 24 };

/** Lines over evenly spaced slots; series: [{name, values (null: no data), cls}]. */
export function lineChart(label, series, { yFormat = (v) => fmt.num(v, v < 10 ? 1 : 0), xLabels = ["", ""] } = {}) {
  const count = Math.max(...series.map((s) => s.values.length), 2);
  const top = Math.max(...series.flatMap((s) => s.values.filter((v) => v !== null)), 0) || 1;
  const x = (i) => PAD.left + (i * (W - PAD.left - PAD.right)) / (count - 1);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const paths = series.map((s) => {
    let d = "", pen = "M";
    s.values.forEach((v, i) => {
      if (v === null) { pen = "M"; return; }
      d += `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
    });
    const alone = s.values.map((v, i) => (v !== null && s.values[i - 1] == null && s.values[i + 1] == null ? i : -1))
      .filter((i) => i >= 0);  // a point with no neighbour draws no line: a dot instead
    return h("g", {}, h("path", { d: d || "M0,0", class: `line ${s.cls}`, "data-series": s.name }),
      alone.map((i) => h("circle", { cx: x(i), cy: y(s.values[i]), r: 2.5, class: `point ${s.cls}` })));
  });
  const last = series.map((s) => `${s.name} ${yFormat([...s.values].reverse().find((v) => v !== null) ?? 0)}`).join(", ");
  return h("figure", { class: "chart" },
    h("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${label}; latest: ${last}` },
      h("line", { x1: PAD.left, x2: W - PAD.right, y1: y(0), y2: y(0), class: "axis" }),
      h("line", { x1: PAD.left, x2: W - PAD.right, y1: y(top), y2: y(top), class: "grid" }),
      h("text", { x: PAD.left - 6, y: y(top) + 4, class: "tick end" }, yFormat(top)),
      h("text", { x: PAD.left - 6, y: y(0) + 4, class: "tick end" }, "0"),
      h("text", { x: PAD.left, y: H - 6, class: "tick" }, xLabels[0]),
      h("text", { x: W - PAD.right, y: H - 6, class: "tick end" }, xLabels[1]),
      paths),
    h("figcaption", {}, h("span", { class: "chart-title" }, label),
      series.map((s) => h("span", { class: `key ${s.cls}` }, s.name))));
}

/** Cosine similarities of texts: one cell per pair, darker when closer. */
export function heatmap(labels, matrix) {
  const n = labels.length, cell = Math.max(18, Math.min(48, Math.floor(420 / n))), left = 150, topPad = 8;
  const size = n * cell;
  const shade = (v) => `hsl(215, 80%, ${Math.round(95 - Math.max(0, v) * 60)}%)`;
  const short = (t) => (t.length > 22 ? `${t.slice(0, 21)}…` : t);
  const cells = [];
  matrix.forEach((values, r) => values.forEach((v, c) => cells.push(
    h("rect", { x: left + c * cell, y: topPad + r * cell, width: cell - 1, height: cell - 1, fill: shade(v),
      class: "cell", "data-row": r, "data-col": c, "data-value": v },
    h("title", {}, `${labels[r]} · ${labels[c]}: ${v.toFixed(3)}`)))));
  return h("figure", { class: "chart" },
    h("svg", { viewBox: `0 0 ${left + size + 8} ${topPad + size + 8}`, role: "img", class: "heatmap",
      "aria-label": `Cosine similarity of ${n} texts to each other` },
    labels.map((t, r) => h("text", { x: left - 6, y: topPad + r * cell + cell / 2 + 4, class: "tick end" }, short(t))),
    cells),
    h("figcaption", {}, h("span", { class: "chart-title" }, "Cosine similarity (darker: closer)")));
}

/** Points on a plane (the texts' first two principal components), each labelled. */
export function scatter(labels, points) {
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const span = (vs) => [Math.min(...vs), Math.max(...vs) - Math.min(...vs) || 1];
  const [x0, xw] = span(xs), [y0, yw] = span(ys);
  const sx = (v) => 40 + ((v - x0) / xw) * (W - 200), sy = (v) => H + 40 - 20 - ((v - y0) / yw) * (H - 20);
  return h("figure", { class: "chart" },
    h("svg", { viewBox: `0 0 ${W} ${H + 40}`, role: "img", class: "scatter",
      "aria-label": `The texts on their first two principal components: close points are similar texts` },
    points.map((p, i) => h("g", {},
      h("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 5, class: "dot" }, h("title", {}, labels[i])),
      h("text", { x: sx(p[0]) + 8, y: sy(p[1]) + 4, class: "tick" }, labels[i].length > 30 ? `${labels[i].slice(0, 29)}…` : labels[i])))),
    h("figcaption", {}, h("span", { class: "chart-title" }, "2-D projection (PCA): close points, similar texts")));
}
