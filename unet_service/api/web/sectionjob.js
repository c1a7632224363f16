// "Run as a background job": a file beyond /v1/segment's limits (a 413) goes to the job API
// instead (POST /v1/jobs); its progress is polled (GET /v1/jobs/ID) and its result, a
// TIFF, downloaded with the key (GET /v1/jobs/ID/result). DELETE cancels it.

import { describe, requestBlob, requestJson, submitJob } from "./api.js";
import { el, percent, saveBlob, stem } from "./dom.js";

const POLL_MS = 1000;
const FINISHED = ["done", "failed", "cancelled"];

function wait(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function duration(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

/** "Job running: 12 of 81 tiles (15%), 0 of 1 pages, about 30 s left". */
export function progressText(job) {
  const p = job.progress;
  const tiles = `${p.tiles_done} of ${plural(p.tiles_total, "tile")} (${Math.round(100 * p.fraction)}%)`;
  const pages = `${p.pages_done} of ${plural(p.pages_total, "page")}`;
  const known = typeof job.eta_s === "number" && job.state === "running";
  const eta = known ? `, about ${duration(job.eta_s)} left` : "";
  return `Job ${job.state}: ${tiles}, ${pages}${eta}`;
}

/** The entry's file as a background job (mask output) of the entry's model, shown in the
 * entry until it ends; the entry's `actions` holds its buttons (cancel, then the result's
 * download), and the entry shows the model the job records. */
export async function runAsJob(entry) {
  const { file, status, progress, actions } = entry;
  const say = (text, error = false) => {
    status.textContent = text;
    status.classList.toggle("error", error);
  };
  const action = (label, name, onClick) => {
    const button = el("button", { type: "button" }, label);
    button.setAttribute("aria-label", name);
    button.addEventListener("click", onClick);
    actions.replaceChildren(button);
    return button;
  };
  let cancelled = false;
  progress.hidden = false;
  progress.value = 0;
  let job;
  try {
    job = await submitJob(file, { output: "mask", model: entry.model }, {
      onUpload: (loaded, total) => {
        progress.value = loaded / total;
        say(`Uploading as a background job ${percent(loaded, total)}`);
      },
      onComputing: () => say("Checking the upload…"),
      onRetry: (left, error) => say(`${describe(error)}. Retrying in ${left} s.`),
    });
    entry.setModel(job.model);
    const cancel = action("Cancel job", `Cancel the job of ${file.name}`, async () => {
      cancel.disabled = true;
      cancelled = true;
      try {
        await requestJson(`/v1/jobs/${job.id}`, { method: "DELETE" });
        actions.replaceChildren();
        progress.hidden = true;
        say("Job cancelled (and deleted on the server)", true);
      } catch (error) {
        cancelled = false;
        cancel.disabled = false;
        say(`Could not cancel the job: ${describe(error)}`, true);
      }
    });
    const show = () => {
      progress.value = job.progress.fraction;
      say(progressText(job));
    };
    show();
    while (!FINISHED.includes(job.state)) {
      await wait(POLL_MS);
      try {
        if (!cancelled) job = await requestJson(`/v1/jobs/${job.id}`);
        if (!cancelled) show();
      } catch (error) {
        if (!cancelled && error.status !== 0 && error.status !== 503) throw error;
        if (!cancelled) say(`${describe(error)}; asking again`, true); // a restart, say
      }
      if (cancelled) return; // the cancel button says what happened
    }
  } catch (error) {
    if (cancelled) return;
    actions.replaceChildren();
    progress.hidden = true;
    const what = job ? `Job ${job.id} lost` : "Not taken as a job either";
    say(`${what}: ${describe(error)}`, true);
    return;
  }
  if (job.state !== "done") {
    actions.replaceChildren();
    progress.hidden = true;
    say(`Job ${job.state}: ${job.error || "no reason given"}`, true);
    return;
  }
  progress.value = 1;
  const { width, height, pages } = job.input;
  const stack = pages > 1 ? `, ${pages} pages` : "";
  say(`Job done: ${width} × ${height} pixels${stack}, ${plural(job.progress.tiles_total, "tile")}`);
  const format = pages > 1 ? "TIFF, all pages" : "TIFF";
  const name = `Download the mask of ${file.name} (${format})`;
  const button = action(`Download mask (${format})`, name, async () => {
    button.disabled = true;
    try {
      saveBlob(await requestBlob(job.result.url), `${stem(file.name)}_mask.tif`);
      say(`Job done: ${width} × ${height} pixels${stack}, mask downloaded`);
    } catch (error) {
      say(`The job's result: ${describe(error)}`, true);
    } finally {
      button.disabled = false;
    }
  });
}
