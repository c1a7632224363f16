// The page's only way into the service: its public API (/v1/segment, /v2, /metrics), with
// the optional bearer token kept in sessionStorage for this tab.

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

export async function requestText(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw await errorFrom(response.status, response.headers, await response.text());
  return response.text();
}

/** One POST /v1/segment with upload progress. Resolves to {blob, headers}. */
function segmentOnce(file, output, { onUpload, onComputing }) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/segment?output=${encodeURIComponent(output)}`);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.responseType = "blob";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onUpload(e.loaded, e.total);
    });
    xhr.upload.addEventListener("load", () => onComputing());
    xhr.addEventListener("load", async () => {
      const headers = { get: (name) => xhr.getResponseHeader(name) };
      if (xhr.status === 200) {
        resolve({ blob: xhr.response, headers });
        return;
      }
      const text = xhr.response ? await xhr.response.text() : "";
      reject(await errorFrom(xhr.status, headers, text));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the connection failed")));
    const form = new FormData();
    form.append("file", file, file.name);
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

/**
 * POST /v1/segment, retrying a 503 after the Retry-After the server sends.
 * handlers: onUpload(loaded, total), onComputing(), onRetry(secondsLeft, error).
 */
export async function segment(file, output, handlers) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await segmentOnce(file, output, handlers);
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 503 || attempt >= MAX_ATTEMPTS) {
        throw error;
      }
      await countdown(error.retryAfter ?? 5, (left) => handlers.onRetry(left, error));
    }
  }
}
