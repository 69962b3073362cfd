// Each served model: its card, workers, queue and throughput, and how a client calls it.
import { api, copyButton, fmt, h } from "../app.js";

function snippets(model) {
  const base = location.origin;
  const curl = `curl ${base}/v1/embeddings \\\n  -H "Authorization: Bearer $EMBEDQ_API_KEY" \\\n  -H "Content-Type: application/json" \\\n` +
    `  -d '{"model": "${model.id}", "input": ["first text", "second text"]}'`;
  const python = `from openai import OpenAI\n\nclient = OpenAI(base_url="${base}/v1", api_key=os.environ["EMBEDQ_API_KEY"])\n` +
    `vectors = client.embeddings.create(model="${model.id}", input=["first text", "second text"])`;
  return [["curl", curl], ["Python (openai)", `import os\n${python}`]];
}

export default {
  title: "Models",
  async open() {},
  async refresh(body) {
    const fleet = await api("/fleet");
    if (!fleet.models.length) { body.replaceChildren(h("p", { class: "empty" }, "No model is served: start a worker.")); return; }
    const open = new Set([...body.querySelectorAll("details[open]")].map((d) => d.dataset.id));
    body.replaceChildren(...fleet.models.map((m) => h("section", { class: "card", "aria-labelledby": `model-${m.id}` },
      h("h2", { id: `model-${m.id}` }, m.id),
      m.description ? h("p", {}, m.description) : null,
      h("dl", { class: "facts" }, [
        ["Checkpoint", m.checkpoint], ["Workers", m.workers], ["Dimensions", m.dimensions],
        ["Context", `${fmt.num(m.max_input_tokens)} tokens`],
        ["Matryoshka sizes", m.matryoshka_dimensions.join(", ") || "–"], ["Tasks", m.tasks.join(", ")],
        ["Tags", m.tags.join(", ") || "–"], ["Prompts", m.prompts.join(", ") || "–"],
        ["Queue", `${m.queue.depth} waiting, ${m.queue.leased} leased, oldest ${fmt.num(m.queue.oldest_age_s, 1)} s`],
        ["Throughput (last minute)", `${fmt.num(m.requests_per_s, 1)} req/s, ${fmt.num(m.inputs_per_s, 1)} inputs/s, ` +
          `${fmt.num(m.tokens_per_s, 0)} tokens/s`],
      ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      h("details", { "data-id": m.id, open: open.has(m.id) },
        h("summary", {}, "How a client calls it"),
        snippets(m).map(([name, code]) => h("div", { class: "snippet" },
          h("div", { class: "snippet-head" }, h("span", {}, name), copyButton(code, `Copy the ${name} example for ${m.id}`)),
          h("pre", {}, h("code", {}, code))))))));
  },
};
