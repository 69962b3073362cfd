// Every batch, whoever made it: progress, status, counts; cancel; download output and errors.
import { api, confirmDialog, fmt, h, say, table } from "../app.js";

const RUNNING = ["validating", "in_progress", "finalizing", "cancelling"];

function progress(b) {
  const c = b.request_counts, done = c.completed + c.failed;
  return h("span", { class: "progress" },
    h("progress", { max: c.total || 1, value: b.status === "completed" ? c.total || 1 : done,
      "aria-label": `${b.id}: ${done} of ${c.total} lines answered` }),
    ` ${fmt.num(done)} / ${fmt.num(c.total)}`);
}

function download(fileId, label) {
  return fileId ? h("a", { href: `/ui/api/files/${encodeURIComponent(fileId)}/content`, download: "" }, label) : null;
}

export default {
  title: "Batches",
  async open() {},
  async refresh(body) {
    const list = (await api("/batches?limit=100")).data;
    body.replaceChildren(table("Batches, newest first (the last 100)", [
      ["Batch", (b) => h("code", {}, b.id)],
      ["Owner", (b) => b.owner || "(anonymous)"],
      ["Status", (b) => h("span", { class: `badge ${b.status}`, "data-status": b.status }, b.status)],
      ["Progress", progress],
      ["Failed", (b) => fmt.num(b.request_counts.failed)],
      ["Created", (b) => fmt.when(b.created_at)],
      ["", (b) => h("span", { class: "row-actions" },
        download(b.output_file_id, "Output"), download(b.error_file_id, "Errors"),
        RUNNING.includes(b.status) && b.status !== "cancelling" ? h("button", { type: "button", class: "small danger",
          "aria-label": `Cancel ${b.id}`, onclick: async () => {
            if (!(await confirmDialog(`Cancel the batch ${b.id}? Lines not yet answered are not run.`, "Cancel batch"))) return;
            try { await api(`/batches/${encodeURIComponent(b.id)}/cancel`, { method: "POST" }); say(`Cancelling ${b.id}.`); }
            catch (error) { say(`Could not cancel ${b.id}: ${error.message}`); }
          } }, "Cancel") : null)],
    ], list, "No batch yet: clients create them through the Batches API (docs/batches.md)."));
  },
};
