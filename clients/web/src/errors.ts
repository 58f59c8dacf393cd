// Turns gRPC errors into something a person can read. The server sends google.rpc.Status details in
// grpc-status-details-bin: ErrorInfo (reason from everything.errors.v1.ErrorReason), BadRequest
// (which field is wrong), RetryInfo and QuotaFailure. Connect hands them over as raw Any values; the
// four google.rpc messages are small, so they are decoded here with the protobuf wire reader instead
// of generating all of google/rpc for the browser.
import { Code, ConnectError } from "@connectrpc/connect";
import { BinaryReader } from "@bufbuild/protobuf/wire";

export interface FieldViolation {
  field: string;
  description: string;
}

export interface ErrorView {
  /** The gRPC code in its canonical spelling, for example "INVALID_ARGUMENT". */
  code: string;
  /** The server's message (or the transport's). */
  message: string;
  /** ErrorInfo.reason, for example "TOKEN_EXPIRED". */
  reason?: string;
  metadata: Record<string, string>;
  fields: FieldViolation[];
  retryAfterSeconds?: number;
  quota: string[];
}

const FRIENDLY: Record<string, string> = {
  INVALID_CREDENTIALS: "Wrong email or password.",
  EMAIL_TAKEN: "An account with this email already exists. Sign in instead.",
  WEAK_PASSWORD: "Choose a stronger password.",
  TOKEN_MISSING: "Please sign in.",
  TOKEN_INVALID: "Your sign-in is not valid any more. Please sign in again.",
  TOKEN_EXPIRED: "Your sign-in expired.",
  SESSION_REVOKED: "You were signed out (the session was revoked). Please sign in again.",
  REFRESH_TOKEN_REUSED: "Your session was ended for safety (a sign-in token was used twice). Please sign in again.",
  NOT_FOUND: "Not found (it may have been deleted).",
  GENERATION_NOT_ACTIVE: "The reply has already finished.",
  RATE_LIMITED: "Too many requests. Slow down a little.",
  QUOTA_EXCEEDED: "A usage quota is used up.",
  SIGN_IN_THROTTLED: "Too many failed sign-ins. Wait a moment before trying again.",
  TOO_MANY_STREAMS: "Too many replies are being generated at once.",
  SERVER_OVERLOADED: "The server is busy. Try again shortly.",
  UPSTREAM_RATE_LIMITED: "The AI model is rate-limited right now.",
  UPSTREAM_UNAVAILABLE: "The AI model is unavailable right now.",
  UPSTREAM_TIMEOUT: "The AI model did not answer in time.",
  UPSTREAM_BAD_RESPONSE: "The AI model sent a response that could not be understood.",
  SEARCH_PROVIDER_UNAVAILABLE: "A search provider is unavailable.",
  DATABASE_UNAVAILABLE: "The service cannot reach its database right now.",
  IMAGE_URL_EXPIRED: "The image link has expired.",
  SHUTTING_DOWN: "The server is restarting. Try again.",
  INTERNAL: "Something went wrong on the server.",
};

/** "InvalidArgument" (Connect's Code name) → "INVALID_ARGUMENT" (gRPC's). */
function codeName(code: Code): string {
  return (Code[code] ?? "Unknown").replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function readErrorInfo(bytes: Uint8Array): { reason: string; metadata: Record<string, string> } {
  const r = new BinaryReader(bytes);
  let reason = "";
  const metadata: Record<string, string> = {};
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    if (no === 1) reason = r.string();
    else if (no === 3) {
      const e = new BinaryReader(r.bytes());
      let k = "";
      let v = "";
      while (e.pos < e.len) {
        const [n, w] = e.tag();
        if (n === 1) k = e.string();
        else if (n === 2) v = e.string();
        else e.skip(w, n);
      }
      metadata[k] = v;
    } else r.skip(wt, no);
  }
  return { reason, metadata };
}

function readBadRequest(bytes: Uint8Array): FieldViolation[] {
  const r = new BinaryReader(bytes);
  const out: FieldViolation[] = [];
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    if (no !== 1) {
      r.skip(wt, no);
      continue;
    }
    const v = new BinaryReader(r.bytes());
    const fv: FieldViolation = { field: "", description: "" };
    while (v.pos < v.len) {
      const [n, w] = v.tag();
      if (n === 1) fv.field = v.string();
      else if (n === 2) fv.description = v.string();
      else v.skip(w, n);
    }
    out.push(fv);
  }
  return out;
}

function readRetryInfo(bytes: Uint8Array): number {
  const r = new BinaryReader(bytes);
  let seconds = 0;
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    if (no !== 1) {
      r.skip(wt, no);
      continue;
    }
    const d = new BinaryReader(r.bytes()); // google.protobuf.Duration
    while (d.pos < d.len) {
      const [n, w] = d.tag();
      if (n === 1) seconds += Number(d.int64());
      else if (n === 2) seconds += d.int32() / 1e9;
      else d.skip(w, n);
    }
  }
  return seconds;
}

function readQuotaFailure(bytes: Uint8Array): string[] {
  const r = new BinaryReader(bytes);
  const out: string[] = [];
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    if (no !== 1) {
      r.skip(wt, no);
      continue;
    }
    const v = new BinaryReader(r.bytes());
    let subject = "";
    let description = "";
    while (v.pos < v.len) {
      const [n, w] = v.tag();
      if (n === 1) subject = v.string();
      else if (n === 2) description = v.string();
      else v.skip(w, n);
    }
    out.push(description ? `${subject}: ${description}` : subject);
  }
  return out;
}

export function describeError(err: unknown): ErrorView {
  const ce = ConnectError.from(err);
  const view: ErrorView = { code: codeName(ce.code), message: ce.rawMessage, metadata: {}, fields: [], quota: [] };
  if (ce.cause instanceof TypeError && !ce.details.length) {
    // fetch() itself failed: no HTTP answer at all (gateway down, CORS refused, offline).
    view.code = "UNAVAILABLE";
    view.message = `cannot reach the server (${ce.rawMessage})`;
  }
  for (const detail of ce.details) {
    if (!("type" in detail) || typeof detail.type !== "string" || !(detail.value instanceof Uint8Array)) continue;
    try {
      switch (detail.type) {
        case "google.rpc.ErrorInfo": {
          const info = readErrorInfo(detail.value);
          view.reason = info.reason;
          view.metadata = info.metadata;
          break;
        }
        case "google.rpc.BadRequest":
          view.fields.push(...readBadRequest(detail.value));
          break;
        case "google.rpc.RetryInfo":
          view.retryAfterSeconds = readRetryInfo(detail.value);
          break;
        case "google.rpc.QuotaFailure":
          view.quota.push(...readQuotaFailure(detail.value));
          break;
      }
    } catch {
      // A detail we cannot decode is ignored; the code and message still say what happened.
    }
  }
  return view;
}

export function reasonOf(err: unknown): string | undefined {
  return err instanceof ConnectError || (err instanceof Error && "code" in err) ? describeError(err).reason : undefined;
}

/** One readable line (plus field lines) for an error. */
export function formatError(err: unknown): string {
  const v = describeError(err);
  const head = (v.reason && FRIENDLY[v.reason]) || v.message || v.code;
  const parts = [head];
  if (v.message && v.message !== head && !(v.reason && FRIENDLY[v.reason] && v.fields.length)) parts.push(`(${v.message})`);
  for (const f of v.fields) parts.push(`\n• ${f.field}: ${f.description}`);
  for (const q of v.quota) parts.push(`\n• ${q}`);
  if (v.retryAfterSeconds !== undefined) parts.push(`\nTry again in ${Math.max(1, Math.ceil(v.retryAfterSeconds))} s.`);
  const tag = v.reason ? `${v.code} · ${v.reason}` : v.code;
  const rid = v.metadata["request_id"];
  return `${parts.join(" ")}\n[${tag}${rid ? ` · request ${rid}` : ""}]`;
}

export function isCancel(err: unknown): boolean {
  return ConnectError.from(err).code === Code.Canceled;
}
