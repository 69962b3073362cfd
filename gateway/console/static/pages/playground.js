// Embed a few texts: tokens, latency, their cosine similarities and a 2-D map of them.
import { api, fmt, h, say } from "../app.js";
import { heatmap, scatter } from "../charts.js";

const EXAMPLE = ["The cat sat on the mat.", "A kitten is sleeping on the rug.", "Stock markets fell sharply today.",
  "Investors sold shares as prices dropped.", "How do I bake sourdough bread?"];

export default {
  title: "Playground",
  async open(body) {
    const fleet = await api("/fleet");
    const embedding = fleet.models.filter((m) => m.tasks.includes("embed"));
    const out = h("div", { id: "playground-result", "aria-live": "polite" });
    const form = h("form", { "aria-label": "Embed texts" },
      h("div", { class: "field" }, h("label", { for: "play-model" }, "Model"),
        h("select", { id: "play-model", name: "model" }, embedding.map((m) => h("option", { value: m.id }, m.id)))),
      h("div", { class: "field" }, h("label", { for: "play-texts" }, "Texts, one per line (at most 64)"),
        h("textarea", { id: "play-texts", name: "texts", rows: 8 }, EXAMPLE.join("\n"))),
      h("div", { class: "actions" }, h("button", { type: "submit", disabled: !embedding.length }, "Embed")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const texts = form.elements.texts.value.split("\n").map((t) => t.trim()).filter(Boolean);
      if (!texts.length) { say("Enter at least one text."); return; }
      try {
        const result = await api("/embed", { method: "POST", body: { model: form.elements.model.value, texts } });
        out.replaceChildren(
          h("p", { class: "facts-line" }, `${texts.length} texts · ${fmt.num(result.tokens)} tokens · ` +
            `${fmt.num(result.latency_ms, 1)} ms · ${result.dimensions} dimensions`),
          h("section", { class: "charts" }, heatmap(texts, result.similarity), scatter(texts, result.points)));
        say("");
      } catch (error) { out.replaceChildren(h("p", { class: "error", role: "alert" }, error.message)); }
    });
    body.append(embedding.length ? form : h("p", { class: "empty" }, "No embedding model is served: start a worker."), out);
  },
};
