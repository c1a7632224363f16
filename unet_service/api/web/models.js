// The model picker: the server's models (GET /v1/models) with their states, the default one
// chosen at first; a select when there are several, the name alone when there is one. A
// model that failed to load cannot be chosen, and its reason is shown. Cards of the models
// (GET /v2/models/NAME) are asked for once each.

import { requestJson } from "./api.js";
import { el } from "./dom.js";

const STATES = {
  READY: "ready",
  LOADING: "loading",
  UNAVAILABLE: "not loaded", // until a request names it
  FAILED: "failed to load",
};

const cards = new Map(); // name -> the promise of its metadata; a card does not change

/** Model `name`'s metadata and card (GET /v2/models/NAME), asked for once (again after a
 * failure). */
export function cardOf(name) {
  if (!cards.has(name)) {
    const pending = requestJson(`/v2/models/${encodeURIComponent(name)}`);
    cards.set(name, pending);
    pending.catch(() => {
      if (cards.get(name) === pending) cards.delete(name);
    });
  }
  return cards.get(name);
}

function optionText({ name, state }, isDefault) {
  return `${name}${isDefault ? " (default)" : ""}: ${STATES[state] || state.toLowerCase()}`;
}

export class ModelPicker {
  /** Renders into `container` (a <dl>); calls onChoose(name) when another model is chosen. */
  constructor(container, onChoose) {
    this.container = container;
    this.onChoose = onChoose;
    this.name = null; // the chosen model, once the list is known
    this.names = "";
    this.select = null;
    this.notes = null;
  }

  get several() {
    return this.select !== null;
  }

  /** Asks for the list and shows it (the choice is kept); throws ApiError as requestJson. */
  async refresh() {
    const listing = await requestJson("/v1/models");
    const names = listing.models.map((m) => m.name).join("\n");
    if (names !== this.names) this.build(listing);
    else if (this.select) this.update(listing);
    this.names = names;
  }

  build({ default: fallback, models }) {
    const chosen = models.some((m) => m.name === this.name) ? this.name : fallback;
    if (models.length === 1) {
      this.select = null;
      this.container.replaceChildren(
        el("dt", {}, "Name"),
        el("dd", { id: "model-name" }, models[0].name),
      );
    } else {
      this.select = el("select", { id: "model-select" });
      this.notes = el("div", { className: "notes" });
      this.select.addEventListener("change", () => this.choose(this.select.value));
      this.container.replaceChildren(
        el("dt", {}, el("label", { htmlFor: "model-select" }, "Name")),
        el("dd", {}, this.select, this.notes),
      );
      this.update({ default: fallback, models });
      this.select.value = chosen;
    }
    if (chosen !== this.name) this.choose(chosen);
  }

  /** The states of the same models, shown in the select's options and under it. */
  update({ default: fallback, models }) {
    if (!this.select.options.length) {
      this.select.append(...models.map((m) => el("option", { value: m.name })));
    }
    models.forEach((m, i) => {
      const option = this.select.options[i];
      option.text = optionText(m, m.name === fallback);
      option.disabled = m.state === "FAILED";
    });
    const failed = models.filter((m) => m.state === "FAILED");
    const note = (m) => el("p", { className: "hint error" }, `${m.name} ${STATES.FAILED}: ${m.reason}`);
    this.notes.replaceChildren(...failed.map(note));
  }

  choose(name) {
    this.name = name;
    this.onChoose(name);
  }
}
