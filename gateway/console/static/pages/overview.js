// The fleet at a glance: tiles, charts of the last minutes (up to an hour), each model now.
import { api, fmt, h, table } from "../app.js";
import { lineChart } from "../charts.js";

function tile(label, value) {
  return h("div", { class: "tile" }, h("span", { class: "tile-value" }, value), h("span", { class: "tile-label" }, label));
}

const WINDOWS = [[300, "5 minutes"], [900, "15 minutes"], [3600, "hour"]];

function perSecond(values, slot) { return values.map((v) => v / slot); }

/** One line per queue (a queue is a checkpoint: its models' jobs), from the samples of the hour. */
function queueSeries(queues, field) {
  return Object.entries(queues).sort().map(([name, q], i) => ({ name, values: q[field], cls: `s${(i % 4) + 1}` }));
}

export default {
  title: "Overview",
  async open(body, view) {
    const choice = h("select", { id: "window", onchange: () => this.refresh(body, view) },
      WINDOWS.map(([seconds, name]) => h("option", { value: seconds, selected: seconds === 900 }, `the last ${name}`)));
    view.window = choice;
    view.content = h("div");
    body.append(h("div", { class: "field inline" }, h("label", { for: "window" }, "Charts and sums over"), choice), view.content);
  },
  async refresh(body, view) {
    const [fleet, activity] = await Promise.all([api("/fleet"), api("/activity")]);
    const slot = activity.slot_s, span = Number(view.window.value), last = (v) => v.slice(-span / slot);
    const s = Object.fromEntries(Object.entries(activity.series).map(([k, v]) => [k, last(v)]));
    const queues = Object.fromEntries(Object.entries(activity.queues).map(([k, q]) =>
      [k, { depth: last(q.depth), oldest_s: last(q.oldest_s) }]));
    const windowName = WINDOWS.find(([seconds]) => seconds === span)[1];
    const lastMinute = (values) => values.slice(-60 / slot).reduce((a, b) => a + b, 0) / 60;
    const sum = (values) => values.reduce((a, b) => a + b, 0);
    const live = fleet.workers.filter((w) => w.state !== "gone");
    const recent = (values) => [...values].reverse().find((v) => v !== null) ?? null;
    const xLabels = [`${windowName === "hour" ? "1 hour" : windowName} ago`, "now"];
    const down = fleet.loops_down.length === 0 ? [] : [h("p", { class: "alert", role: "alert" },
      `Background work is failing and restarting: ${fleet.loops_down.join(", ")}. The gateway's log says why.`)];
    view.content.replaceChildren(
      ...down,
      h("section", { class: "tiles", "aria-label": "Now" },
        tile("models", fleet.models.length),
        tile("live workers", live.length),
        tile("inputs/s (last minute)", fmt.num(lastMinute(s.inputs), 1)),
        tile("tokens/s (last minute)", fmt.num(lastMinute(s.tokens), 0)),
        tile("p50 latency", fmt.ms(recent(s.p50))),
        tile("p95 latency", fmt.ms(recent(s.p95))),
        tile(`errors (${windowName})`, fmt.num(sum(s.errors))),
        tile(`429s (${windowName})`, fmt.num(sum(s.rejected)))),
      h("section", { class: "charts", "aria-label": `The last ${windowName}` },
        lineChart("Inputs per second", [{ name: "inputs/s", values: perSecond(s.inputs, slot), cls: "s1" },
          { name: "batch inputs/s", values: perSecond(s.batch_inputs, slot), cls: "s2" }], { xLabels }),
        lineChart("Tokens per second", [{ name: "tokens/s", values: perSecond(s.tokens, slot), cls: "s1" },
          { name: "batch tokens/s", values: perSecond(s.batch_tokens, slot), cls: "s2" }], { xLabels }),
        lineChart("Latency", [{ name: "p50", values: s.p50, cls: "s1" }, { name: "p95", values: s.p95, cls: "s3" }],
          { xLabels, yFormat: fmt.ms }),
        lineChart("Errors and 429s per 10 s", [{ name: "errors", values: s.errors, cls: "s4" },
          { name: "429s", values: s.rejected, cls: "s3" }], { xLabels }),
        lineChart("Queue depth (jobs waiting), by queue", queueSeries(queues, "depth"), { xLabels }),
        lineChart("Oldest waiting job, by queue", queueSeries(queues, "oldest_s"),
          { xLabels, yFormat: (v) => `${fmt.num(v, v < 1 ? 2 : 1)} s` })),
      table("Models now", [
        ["Model", (m) => h("a", { href: "#/models" }, m.id)],
        ["Workers", (m) => m.workers],
        ["Waiting", (m) => m.queue.depth],
        ["Leased", (m) => m.queue.leased],
        ["Oldest job", (m) => `${fmt.num(m.queue.oldest_age_s, 1)} s`],
        ["Inputs/s", (m) => fmt.num(m.inputs_per_s, 1)],
        ["Tokens/s", (m) => fmt.num(m.tokens_per_s, 0)],
      ], fleet.models, "No model is served: start a worker."),
      table("The last hour, by model", [
        ["Model", ([name]) => name],
        ["Requests", ([, m]) => fmt.num(m.requests)],
        ["Inputs", ([, m]) => fmt.num(m.inputs)],
        ["Tokens", ([, m]) => fmt.num(m.tokens)],
        ["Batch inputs", ([, m]) => fmt.num(m.batch_inputs)],
        ["p50", ([, m]) => fmt.ms(m.p50)],
        ["p95", ([, m]) => fmt.ms(m.p95)],
        ["Errors", ([, m]) => fmt.num(m.errors)],
        ["429s", ([, m]) => fmt.num(m.rejected)],
      ], Object.entries(activity.models), "No calls in the last hour."));
  },
};
