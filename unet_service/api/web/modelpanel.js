// The "Model" panel: the picker (models.js) and the chosen model's card (status.js), asked
// for again while the server could not answer (loading, or unreachable).

import { describe } from "./api.js";
import { el } from "./dom.js";
import { cardOf, ModelPicker } from "./models.js";
import { showCard } from "./status.js";

export class ModelPanel {
  /** The picker goes in `choice` (a <dl>), the chosen model's card in `cardBox`; onCard(card)
   * is called with each card shown. */
  constructor(choice, cardBox, onCard) {
    this.cardBox = cardBox;
    this.onCard = onCard;
    this.card = null; // the chosen model's card, once had
    this.later = false; // the models could not be had yet: ask again once the server is ready
    this.picker = new ModelPicker(choice, (name) => this.choose(name));
  }

  /** The chosen model (null until the server has listed its models). */
  get name() {
    return this.picker.name;
  }

  /** Whether the server serves several models (results then say which one they are of). */
  get several() {
    return this.picker.several;
  }

  /** The models and their states, and the chosen one's card. */
  async refresh() {
    try {
      await this.picker.refresh();
      if (this.name && this.card?.name !== this.name) await this.show(this.name);
      this.later = false;
    } catch (error) {
      this.later = error.status === 0 || error.status === 503;
      if (!this.card) this.showError(error); // a card shown stays; the states are asked again
    }
  }

  choose(name) {
    this.card = null;
    this.cardBox.replaceChildren(el("p", {}, "Loading the model card…"));
    this.show(name).catch((error) => this.showError(error));
  }

  async show(name) {
    const card = await cardOf(name);
    if (this.name !== name) return; // another model was chosen meanwhile
    this.card = card;
    showCard(this.cardBox, card);
    this.onCard(card);
  }

  showError(error) {
    this.cardBox.replaceChildren(el("p", { className: "error" }, describe(error)));
  }
}
