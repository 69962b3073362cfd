// Every worker: who and where it is, what it runs, how it is doing.
import { api, fmt, h, table } from "../app.js";

function engine(settings) {
  const entries = Object.entries(settings);
  if (!entries.length) return "–";
  return h("details", {}, h("summary", {}, settings.type || "settings"),
    h("dl", { class: "facts small" }, entries.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])));
}

export default {
  title: "Workers",
  async open() {},
  async refresh(body) {
    const fleet = await api("/fleet");
    const open = new Set([...body.querySelectorAll("tr[data-id] details[open]")].map((d) => d.closest("tr").dataset.id));
    const view = table("Workers (live, and those gone in the last 10 minutes)", [
      ["Worker", (w) => h("code", {}, w.id)],
      ["State", (w) => h("span", { class: `badge ${w.state}` }, w.state)],
      ["Host", (w) => w.host || "–"],
      ["Models", (w) => w.models.join(", ")],
      ["Version", (w) => `${w.software || "?"} · config ${w.version}`],
      ["Engine", (w) => engine(w.engine)],
      ["Last heartbeat", (w) => fmt.ago(w.heartbeat_at, fleet.now)],
      ["Leases", (w) => w.leases],
      ["Batches/s", (w) => fmt.num(w.posts_per_s, 1)],
      ["Inputs/s", (w) => fmt.num(w.inputs_per_s, 1)],
    ], fleet.workers, "No worker has registered.");
    if (view.tagName === "TABLE") {
      [...view.tBodies[0].rows].forEach((row, i) => {
        row.dataset.id = fleet.workers[i].id;
        if (open.has(row.dataset.id)) row.querySelector("details")?.setAttribute("open", "");
      });
    }
    body.replaceChildren(view);
  },
};
