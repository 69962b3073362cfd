// API keys: list, create (the secret shown once), change limits, revoke.
import { api, confirmDialog, copyButton, fmt, h, say, table, currentSession } from "../app.js";

const LIMITS = [["rpm", "Requests per minute"], ["tpm", "Tokens per minute"], ["concurrency", "Concurrent requests"],
  ["budget", "Budget (e.g. 5000000/month)"], ["weight", "Fair-share weight"]];

function limitsText(limits) {
  const parts = [];
  if (limits.rpm) parts.push(`${fmt.num(limits.rpm)} rpm`);
  if (limits.tpm) parts.push(`${fmt.num(limits.tpm)} tpm`);
  if (limits.concurrency) parts.push(`${limits.concurrency} at once`);
  if (limits.budget) parts.push(`${fmt.num(limits.budget)} tokens/${limits.budget_period}`);
  if (limits.weight !== undefined && limits.weight !== 1) parts.push(`weight ${limits.weight}`);
  if (limits.max_priority && limits.max_priority !== "default") parts.push(`priority up to ${limits.max_priority}`);
  return parts.join(", ") || "none";
}

function field(prefix, name, label, value = "", type = "text") {
  const id = `${prefix}-${name}`;  // the create form's and the dialog's fields: ids of their own
  return h("div", { class: "field" }, h("label", { for: id }, label), h("input", { id, name, type, value }));
}

function limitsBody(form, creating) {
  const body = {};
  for (const [name] of LIMITS) {
    const raw = form.elements[name].value.trim();
    if (raw === "") { if (!creating) body[name] = null; continue; }
    body[name] = name === "budget" ? raw : Number(raw);
  }
  const priority = form.elements.max_priority.value;
  if (priority) body.max_priority = priority; else if (!creating) body.max_priority = null;
  const models = form.elements.models.value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) body.models = models; else if (!creating) body.models = null;
  return body;
}

function limitFields(key, prefix) {
  const limits = key ? key.limits : {};
  const budget = limits.budget ? `${limits.budget}/${limits.budget_period}` : "";
  return [
    field(prefix, "models", "Models (comma-separated; empty: all)", key && key.models ? key.models.join(", ") : ""),
    ...LIMITS.map(([name, label]) => field(prefix, name, label, name === "budget" ? budget : limits[name] ?? "",
      name === "budget" ? "text" : "number")),
    h("div", { class: "field" }, h("label", { for: `${prefix}-max_priority` }, "Highest priority"),
      h("select", { id: `${prefix}-max_priority`, name: "max_priority" },
        ["", "interactive", "default", "batch"].map((p) => h("option", { value: p, selected: (limits.max_priority || "") === p && !!key },
          p || "any")))),
  ];
}

function editDialog(key, done) {
  const form = h("form", { class: "grid" }, limitFields(key, "edit"),
    h("div", { class: "actions" },
      h("button", { type: "button", value: "cancel", onclick: () => dialog.close() }, "Cancel"),
      h("button", { type: "submit" }, "Save")));
  const dialog = h("dialog", { "aria-label": `Limits of ${key.name}` }, h("h2", {}, `Limits of ${key.name}`), form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api(`/keys/${encodeURIComponent(key.name)}`, { method: "PATCH", body: limitsBody(form, false) });
      dialog.close();
      say(`Changed the limits of ${key.name}.`);
      await done();
    } catch (error) { say(`Could not change ${key.name}: ${error.message}`); }
  });
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}

async function draw(body) {
  const keys = (await api("/keys")).data;
  const list = table("API keys", [
    ["Name", (k) => k.name],
    ["State", (k) => h("span", { class: `badge ${k.state}` }, k.state)],
    ["Models", (k) => (k.models ? k.models.join(", ") : "all")],
    ["Limits", (k) => limitsText(k.limits)],
    ["Expires", (k) => fmt.when(k.expires_at)],
    ["Created", (k) => fmt.when(k.created_at)],
    ["Last used", (k) => fmt.ago(k.last_used_at)],
    ["", (k) => (k.state === "revoked" ? "" : h("span", { class: "row-actions" },
      h("button", { type: "button", class: "small", "aria-label": `Change the limits of ${k.name}`,
        onclick: () => editDialog(k, () => draw(body)) }, "Limits"),
      h("button", { type: "button", class: "small danger", "aria-label": `Revoke ${k.name}`, onclick: async () => {
        if (!(await confirmDialog(`Revoke the key ${k.name}? Its next request gets 401.`, "Revoke"))) return;
        try { await api(`/keys/${encodeURIComponent(k.name)}`, { method: "DELETE" }); say(`Revoked ${k.name}.`); }
        catch (error) { say(`Could not revoke ${k.name}: ${error.message}`); }
        await draw(body);
      } }, "Revoke")))],
  ], keys, "No key yet.");
  body.querySelector("#key-list").replaceChildren(list);
}

export default {
  title: "API keys",
  async open(body) {
    if (currentSession().keys !== "managed") {
      body.append(h("p", { class: "empty" }, currentSession().keys === "file"
        ? "This gateway reads its keys from a file (EMBEDQ_KEYS_FILE): change them there."
        : "This gateway serves without API keys: set EMBEDQ_KEYS_DB (one gateway) or EMBEDQ_KEYS_REDIS=true (replicas)."));
      return;
    }
    const secret = h("div", { id: "new-secret", role: "region", "aria-label": "New key" });
    const form = h("form", { class: "grid", "aria-label": "Create a key" },
      field("new", "name", "Name"), field("new", "expires_in", "Expires in (e.g. 90d; empty: never)"), limitFields(null, "new"),
      h("div", { class: "actions" }, h("button", { type: "submit" }, "Create key")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const payload = { name: form.elements.name.value.trim(), ...limitsBody(form, true) };
      const expires = form.elements.expires_in.value.trim();
      if (expires) payload.expires_in = expires;
      try {
        const created = await api("/keys", { method: "POST", body: payload });
        secret.replaceChildren(h("div", { class: "secret" },
          h("p", {}, `The key ${created.name}: copy it now, it is not shown again.`),
          h("code", { id: "secret-value" }, created.key), copyButton(created.key, `Copy the key ${created.name}`)));
        form.reset();
        say(`Created ${created.name}.`);
        await draw(body);
      } catch (error) { say(`Could not create the key: ${error.message}`); }
    });
    body.append(h("section", { "aria-label": "New key" }, h("h2", {}, "Create a key"), form, secret),
      h("section", { id: "key-list", "aria-label": "Keys" }));
    await draw(body);
  },
};
