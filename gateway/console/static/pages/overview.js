// The fleet at a glance: tiles, the last hour's charts, and each model's queue now.
import { api, fmt, h, table } from "../app.js";
import { lineChart } from "../charts.js";

function tile(label, value) {
  return h("div", { class: "tile" }, h("span", { class: "tile-value" }, value), h("span", { class: "tile-label" }, label));
}

function perSecond(values, slot) { return values.map((v) => v / slot); }

/** One line per queue (a queue is a checkpoint: its models' jobs), from the samples of the hour. */
function queueSeries(queues, field) {
  return Object.entries(queues).sort().map(([name, q], i) => ({ name, values: q[field], cls: `s${(i % 4) + 1}` }));
}

export default {
  title: "Overview",
  async open() {},
  async refresh(body) {
    const [fleet, activity] = await Promise.all([api("/fleet"), api("/activity")]);
    const s = activity.series, slot = activity.slot_s;
    const lastMinute = (values) => values.slice(-60 / slot).reduce((a, b) => a + b, 0) / 60;
    const sum = (values) => values.reduce((a, b) => a + b, 0);
    const live = fleet.workers.filter((w) => w.state !== "gone");
    const recent = (values) => [...values].reverse().find((v) => v !== null) ?? null;
    const xLabels = ["1 hour ago", "now"];
    body.replaceChildren(
      h("section", { class: "tiles", "aria-label": "Now" },
        tile("models", fleet.models.length),
        tile("live workers", live.length),
        tile("inputs/s (last minute)", fmt.num(lastMinute(s.inputs), 1)),
        tile("tokens/s (last minute)", fmt.num(lastMinute(s.tokens), 0)),
        tile("p50 latency", fmt.ms(recent(s.p50))),
        tile("p95 latency", fmt.ms(recent(s.p95))),
        tile("errors (hour)", fmt.num(sum(s.errors))),
        tile("429s (hour)", fmt.num(sum(s.rejected)))),
      h("section", { class: "charts", "aria-label": "The last hour" },
        lineChart("Inputs per second", [{ name: "inputs/s", values: perSecond(s.inputs, slot), cls: "s1" }], { xLabels }),
        lineChart("Tokens per second", [{ name: "tokens/s", values: perSecond(s.tokens, slot), cls: "s2" }], { xLabels }),
        lineChart("Latency", [{ name: "p50", values: s.p50, cls: "s1" }, { name: "p95", values: s.p95, cls: "s3" }],
          { xLabels, yFormat: fmt.ms }),
        lineChart("Errors and 429s per 10 s", [{ name: "errors", values: s.errors, cls: "s4" },
          { name: "429s", values: s.rejected, cls: "s3" }], { xLabels }),
        lineChart("Queue depth (jobs waiting), by queue", queueSeries(activity.queues, "depth"), { xLabels }),
        lineChart("Oldest waiting job, by queue", queueSeries(activity.queues, "oldest_s"),
          { xLabels, yFormat: (v) => `${fmt.num(v, 1)} s` })),
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
        ["p50", ([, m]) => fmt.ms(m.p50)],
        ["p95", ([, m]) => fmt.ms(m.p95)],
        ["Errors", ([, m]) => fmt.num(m.errors)],
        ["429s", ([, m]) => fmt.num(m.rejected)],
      ], Object.entries(activity.models), "No calls in the last hour."));
  },
};
