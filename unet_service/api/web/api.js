// The page's only way into the service: its public API (/v1/segment, /v1/preview, /v1/jobs,
// /v1/models, /v2, /metrics), with the optional bearer token kept in sessionStorage for this tab.

const KEY_STORE = "unet-api-key";
const MAX_ATTEMPTS = 20; // 503s retried, each after the server's Retry-After

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY_STORE, value);
  else sessionStorage.removeItem(KEY_STORE);
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

const MEANING = {
  0: "Could not reach the server",
  401: "The server needs an API key: enter it under “API key” at the top",
  404: "Not found on this server",
  413: "Too large for this server",
  415: "Not an image in a format the server reads",
  422: "The server could not use this image",
  500: "The computation failed on the server",
  503: "The server is busy or not ready",
  504: "The server did not finish in time",
};

/** A readable sentence for an error: what it means, the status, and the server's words. */
export function describe(error) {
  if (!(error instanceof ApiError)) return `Unexpected error in the page: ${error.message}`;
  const meaning = MEANING[error.status] || "The server refused the request";
  const code = error.status ? ` (${error.status})` : "";
  return `${meaning}${code}: ${error.message}`;
}

async function errorFrom(status, headers, bodyText) {
  let message = bodyText.trim() || "no details";
  try {
    const parsed = JSON.parse(bodyText);
    if (parsed && typeof parsed.error === "string") message = parsed.error;
  } catch {
    // not JSON (a proxy's page, say): keep the text
  }
  const retry = Number.parseInt(headers.get("Retry-After") || "", 10);
  return new ApiError(status, message, Number.isFinite(retry) ? retry : null);
}

/** GET or POST JSON; resolves to the parsed body, or throws ApiError. */
export async function requestJson(path, { method = "GET", body = undefined, allow = [] } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: { ...authHeaders(), ...(body === undefined ? {} : { "Content-Type": "application/json" }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, e.message);
  }
  if (!response.ok && !allow.includes(response.status)) {
    throw await errorFrom(response.status, response.headers, await response.text());
  }
  return response.json();
}

/** GET with the key; resolves to the Response when it is ok, or throws ApiError. */
async function get(path) {
  let response;
  try {
    response = await fetch(path, { headers: authHeaders() });
  } catch (e) {
    throw new ApiError(0, e.message);
  }
  if (!response.ok) throw await errorFrom(response.status, response.headers, await response.text());
  return response;
}

export async function requestText(path) {
  return (await get(path)).text();
}

/** A file of the API (a job's result) as a Blob. */
export async function requestBlob(path) {
  return (await get(path)).blob();
}

const IGNORE = () => {};

/** One POST of `file` (a File, or a Blob with `name`) as the multipart field `file`, with
 * upload progress. Resolves to {response, headers} for a 2xx answer (`responseType` "blob" or
 * "json"), or throws ApiError. */
function postFile(
  path,
  file,
  responseType,
  { onUpload = IGNORE, onComputing = IGNORE } = {},
  name = file.name,
) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.responseType = "blob";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onUpload(e.loaded, e.total);
    });
    xhr.upload.addEventListener("load", () => onComputing());
    xhr.addEventListener("load", async () => {
      const headers = { get: (name) => xhr.getResponseHeader(name) };
      const ok = xhr.status >= 200 && xhr.status < 300;
      if (ok && responseType !== "json") {
        resolve({ response: xhr.response, headers });
        return;
      }
      const text = xhr.response ? await xhr.response.text() : "";
      if (!ok) {
        reject(await errorFrom(xhr.status, headers, text));
      } else {
        try {
          resolve({ response: JSON.parse(text), headers });
        } catch {
          reject(new ApiError(xhr.status, `the server's answer is not JSON: ${text.slice(0, 200)}`));
        }
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the connection failed")));
    const form = new FormData();
    form.append("file", file, name);
    xhr.send(form);
  });
}

/** Waits `seconds`, calling onTick(secondsLeft) once a second. */
function countdown(seconds, onTick) {
  return new Promise((resolve) => {
    let left = seconds;
    const tick = () => {
      if (left <= 0) {
        resolve();
        return;
      }
      onTick(left);
      left -= 1;
      setTimeout(tick, 1000);
    };
    tick();
  });
}

/** `attempt()`, again after the server's Retry-After for as long as it answers 503. */
async function retrying(attempt, onRetry = IGNORE) {
  for (let tries = 1; ; tries += 1) {
    try {
      return await attempt();
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 503 || tries >= MAX_ATTEMPTS) throw error;
      await countdown(error.retryAfter ?? 5, (left) => onRetry(left, error));
    }
  }
}

/** `path` with the query `params` (those that are null or "" left out). */
function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") query.set(name, String(value));
  }
  return `${path}?${query}`;
}

/**
 * POST /v1/segment with `output` and `model` (null: the server's default model), retrying a
 * 503 after the Retry-After the server sends; resolves to {blob, headers}. handlers (each
 * optional): onUpload(loaded, total), onComputing(), onRetry(secondsLeft, error).
 */
export async function segment(file, { output, model = null }, handlers = {}) {
  const path = withQuery("/v1/segment", { output, model });
  const { response, headers } = await retrying(
    () => postFile(path, file, "blob", handlers),
    handlers.onRetry,
  );
  return { blob: response, headers };
}

/** POST /v1/jobs: the file as a background job of `model` (503s retried as for segment);
 * resolves to the job's JSON. handlers as for segment. */
export async function submitJob(file, { output, model = null }, handlers = {}) {
  const path = withQuery("/v1/jobs", { output, model });
  const { response } = await retrying(() => postFile(path, file, "json", handlers), handlers.onRetry);
  return response;
}

/**
 * POST /v1/preview: page `page` of `file` as the server shows it, a PNG Blob at most
 * `maxSide` pixels on its longer side: an image as the overlay shows it, or with `colour`
 * ("classes", "instances") a mask or instances answer sent back, in the overlay's colours
 * (a class's colour depends on the `model`'s classes). 503s are retried as for segment.
 */
export async function preview(
  file,
  { page = 1, maxSide, colour = null, model = null, name = file.name },
) {
  const path = withQuery("/v1/preview", { page, max_side: maxSide, colour, model });
  const { response } = await retrying(() => postFile(path, file, "blob", {}, name));
  return response;
}
