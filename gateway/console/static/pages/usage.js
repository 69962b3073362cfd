// Usage by key or by model over a chosen range: a chart, a table, and the same as CSV.
import { api, fmt, h } from "../app.js";
import { lineChart } from "../charts.js";

function day(offset) { return new Date(Date.now() + offset * 86400e3).toISOString().slice(0, 10); }

function query(form, format) {
  const params = new URLSearchParams({
    from: form.elements.from.value, to: `${form.elements.to.value}T23:59:59Z`, by: form.elements.by.value,
    granularity: form.elements.granularity.value,
  });
  if (format) params.set("format", format);
  return `/usage?${params}`;
}

function select(name, label, options) {
  return h("div", { class: "field" }, h("label", { for: `usage-${name}` }, label),
    h("select", { id: `usage-${name}`, name }, options.map(([value, text]) => h("option", { value }, text))));
}

async function draw(form, out) {
  const report = await api(query(form));
  const by = report.by;
  const periods = [...new Set(report.data.map((r) => r.start))].sort();
  const names = [...new Set(report.data.map((r) => r[by]))].sort();
  const series = names.slice(0, 6).map((name, i) => ({
    name, cls: `s${(i % 4) + 1}`,
    values: periods.map((p) => report.data.find((r) => r.start === p && r[by] === name)?.prompt_tokens ?? 0),
  }));
  const csv = h("a", { href: `/ui/api${query(form, "csv")}`, download: `embedq-usage-by-${by}.csv`, class: "button" }, "Export CSV");
  out.replaceChildren(
    h("div", { class: "actions" }, csv),
    periods.length ? lineChart(`Prompt tokens per ${form.elements.granularity.value}, by ${by}`, series,
      { xLabels: [periods[0], periods[periods.length - 1]] }) : null,
    h("table", {},
      h("caption", {}, `Usage by ${by}, ${report.from} to ${report.to}`),
      h("thead", {}, h("tr", {}, ["Period", by === "key" ? "Key" : "Model", "Requests", "Inputs", "Prompt tokens", "429s",
        "Errors", "Batch tokens"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, report.data.length ? report.data.map((r) => h("tr", {},
        [r.start, r[by], fmt.num(r.requests), fmt.num(r.inputs), fmt.num(r.prompt_tokens), fmt.num(r.rejected),
          Object.entries(r.errors).map(([c, n]) => `${c}: ${n}`).join(", ") || "–", fmt.num(r.batch_prompt_tokens)]
          .map((v) => h("td", {}, v)))) : h("tr", {}, h("td", { colspan: 8 }, "No usage in this range.")))));
}

export default {
  title: "Usage",
  async open(body) {
    const out = h("div", { id: "usage-report" });
    const form = h("form", { class: "grid", "aria-label": "Usage range" },
      h("div", { class: "field" }, h("label", { for: "usage-from" }, "From"), h("input", { id: "usage-from", name: "from", type: "date", value: day(-6) })),
      h("div", { class: "field" }, h("label", { for: "usage-to" }, "To"), h("input", { id: "usage-to", name: "to", type: "date", value: day(0) })),
      select("by", "By", [["key", "key"], ["model", "model"]]),
      select("granularity", "Per", [["day", "day"], ["hour", "hour"]]),
      h("div", { class: "actions" }, h("button", { type: "submit" }, "Show")));
    form.addEventListener("submit", async (event) => { event.preventDefault(); await draw(form, out); });
    form.addEventListener("change", () => draw(form, out));
    body.append(form, out);
    await draw(form, out);
  },
};
