// Chat: the thread list and one thread, whose assistant replies stream in token by token.
//
// Every reply event carries (message_id, seq). The text and last seq of a reply being generated are
// kept in sessionStorage, so after a reload (or a dropped connection) the reply continues with
// WatchMessage(message_id, after_seq) from where this tab left off. Leaving the page closes the
// stream but does not stop the generation; the Stop button does (CancelGeneration).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { clear, fmtTime, h } from "../dom";
import { describeError } from "../errors";
import {
  FeedbackRating,
  type Message,
  MessageRole,
  type MessageCompleted,
  type MessageStarted,
  MessageStatus,
  type TextDelta,
  type Thread,
  type ThreadTitleSet,
  type Usage,
  type UsageReported,
  type UserMessageSaved,
} from "../gen/everything/chat/v1/chat_pb";
import type { Ctx, Unmount } from "../main";

type ReplyEvent =
  | { case: "userMessageSaved"; value: UserMessageSaved }
  | { case: "messageStarted"; value: MessageStarted }
  | { case: "textDelta"; value: TextDelta }
  | { case: "usageReported"; value: UsageReported }
  | { case: "threadTitleSet"; value: ThreadTitleSet }
  | { case: "messageCompleted"; value: MessageCompleted }
  | { case: undefined; value?: undefined };

/** SendMessage, WatchMessage and RegenerateMessage responses all have this shape. */
interface ReplyResponse {
  messageId: string;
  seq: bigint;
  event: ReplyEvent;
}

interface Bubble {
  id: string;
  role: MessageRole;
  el: HTMLElement;
  body: HTMLElement;
  badge: HTMLElement;
  meta: HTMLElement;
  actions: HTMLElement;
  text: string;
  seq: bigint;
  status: MessageStatus;
  /** The text shown came from ListMessages; a WatchMessage from seq 0 rebuilds it from the events. */
  replaceOnFirstEvent: boolean;
  message?: Message;
}

const PENDING = "everything.chat.pending.";
const RESUME_ATTEMPTS = 4;

const STATUS_NAMES: Record<MessageStatus, string> = {
  [MessageStatus.UNSPECIFIED]: "unspecified",
  [MessageStatus.GENERATING]: "generating",
  [MessageStatus.COMPLETED]: "completed",
  [MessageStatus.CANCELLED]: "cancelled",
  [MessageStatus.FAILED]: "failed",
};

interface Pending {
  threadId: string;
  seq: string;
  text: string;
}

function loadPending(messageId: string): Pending | null {
  try {
    const raw = sessionStorage.getItem(PENDING + messageId);
    return raw ? (JSON.parse(raw) as Pending) : null;
  } catch {
    return null;
  }
}

/** Errors after which following the reply again makes sense (the connection, not the request, failed). */
function transient(err: unknown): boolean {
  const v = describeError(err);
  if (v.reason) return v.reason === "SHUTTING_DOWN" || v.reason === "SERVER_OVERLOADED";
  const code = ConnectError.from(err).code;
  return [Code.Unavailable, Code.Unknown, Code.Internal, Code.DeadlineExceeded, Code.Aborted].includes(code);
}

function usageText(u: Usage | undefined): string {
  if (!u || (u.promptTokens === 0 && u.completionTokens === 0)) return "";
  return `${u.promptTokens} + ${u.completionTokens} tokens${u.estimated ? " (estimated)" : ""}`;
}

export function chatView(root: HTMLElement, ctx: Ctx, params: string[]): Unmount {
  const { api } = ctx;
  const ac = new AbortController(); // closes this view's streams when it goes away
  let threadId = params[0] ?? "";
  const bubbles = new Map<string, Bubble>();
  let live: Bubble | null = null; // the reply the Stop button stops
  let replacing: Bubble | null = null; // the reply a RegenerateMessage replaces on screen
  let sending = false;

  // -- layout -------------------------------------------------------------------------------------
  const threadList = h("ul", { class: "threads", testid: "thread-list" });
  const moreThreads = h("button", { class: "link", hidden: true, testid: "threads-more" }, "More…");
  const title = h("h2", { testid: "thread-title" }, "New chat");
  const renameBtn = h("button", { class: "link", testid: "thread-rename", hidden: !threadId }, "Rename");
  const deleteBtn = h("button", { class: "link danger", testid: "thread-delete", hidden: !threadId }, "Delete");
  const messagesEl = h("div", { class: "messages", testid: "messages", "aria-live": "polite" });
  const input = h("textarea", {
    rows: 3,
    placeholder: "Message… (Enter to send, Shift+Enter for a new line)",
    testid: "chat-input",
    maxlength: 32000,
  });
  const sendBtn = h("button", { type: "submit", class: "primary", testid: "chat-send" }, "Send");
  const stopBtn = h("button", { type: "button", class: "danger", testid: "chat-stop", hidden: true }, "Stop");
  const composer = h("form", { class: "composer", testid: "composer" }, input, h("div", { class: "col" }, sendBtn, stopBtn));

  root.append(
    h(
      "div",
      { class: "chat-layout" },
      h(
        "aside",
        { class: "sidebar" },
        h("button", { class: "primary wide", testid: "new-thread", onclick: () => ctx.navigate("#/chat") }, "New chat"),
        threadList,
        moreThreads,
      ),
      h("section", { class: "thread" }, h("div", { class: "thread-head" }, title, renameBtn, deleteBtn), messagesEl, composer),
    ),
  );

  // -- the thread list ------------------------------------------------------------------------------
  let threadsToken = "";
  function threadItem(t: Thread): HTMLElement {
    return h(
      "li",
      { "data-thread-id": t.id, class: t.id === threadId ? "active" : "" },
      h(
        "a",
        { href: `#/chat/${t.id}`, testid: "thread-item" },
        h("span", { class: "title" }, t.title || "Untitled"),
        h("small", null, fmtTime(t.updateTime ? timestampDate(t.updateTime) : undefined)),
      ),
    );
  }
  function upsertThread(t: Thread): void {
    threadList.querySelector(`li[data-thread-id="${CSS.escape(t.id)}"]`)?.remove();
    threadList.prepend(threadItem(t));
  }
  function setThreadTitle(id: string, text: string): void {
    if (id === threadId) title.textContent = text || "Untitled";
    const span = threadList.querySelector(`li[data-thread-id="${CSS.escape(id)}"] .title`);
    if (span) span.textContent = text || "Untitled";
  }
  async function loadThreads(more = false): Promise<void> {
    try {
      const res = await api.call(
        (o) => api.chat.listThreads({ pageSize: 50, pageToken: more ? threadsToken : "" }, o),
        ac.signal,
      );
      if (!more) threadList.replaceChildren();
      for (const t of res.threads) threadList.append(threadItem(t));
      threadsToken = res.nextPageToken;
      moreThreads.hidden = !threadsToken;
    } catch (err) {
      ctx.showError(err);
    }
  }
  moreThreads.onclick = () => void loadThreads(true);

  // -- message bubbles ------------------------------------------------------------------------------
  function setStatus(b: Bubble, status: MessageStatus, errorReason = ""): void {
    b.status = status;
    b.el.dataset.status = STATUS_NAMES[status];
    b.badge.textContent =
      status === MessageStatus.GENERATING
        ? "writing…"
        : status === MessageStatus.CANCELLED
          ? "cancelled"
          : status === MessageStatus.FAILED
            ? `failed${errorReason ? `: ${errorReason}` : ""}`
            : "";
    b.badge.hidden = !b.badge.textContent;
    if (errorReason) b.el.dataset.errorReason = errorReason;
    renderActions(b);
    updateComposer();
  }

  function setText(b: Bubble, text: string): void {
    b.text = text;
    b.body.textContent = text;
  }

  function newBubble(id: string, role: MessageRole): Bubble {
    const body = h("div", { class: "body", testid: "message-content" });
    const badge = h("span", { class: "badge", testid: "message-status", hidden: true });
    const meta = h("small", { class: "meta", testid: "message-meta" });
    const actions = h("div", { class: "actions" });
    const roleName = role === MessageRole.USER ? "user" : "assistant";
    const el = h(
      "article",
      { class: `message ${roleName}`, testid: "message", "data-role": roleName, "data-message-id": id },
      h("header", null, h("strong", null, role === MessageRole.USER ? "You" : "Assistant"), badge),
      body,
      h("footer", null, meta, actions),
    );
    const b: Bubble = { id, role, el, body, badge, meta, actions, text: "", seq: 0n, status: MessageStatus.UNSPECIFIED, replaceOnFirstEvent: false };
    bubbles.set(id, b);
    messagesEl.append(el);
    return b;
  }

  function showMessage(m: Message, seq?: bigint): Bubble {
    const b = bubbles.get(m.id) ?? newBubble(m.id, m.role);
    b.message = m;
    setText(b, m.content);
    b.seq = seq ?? m.seq;
    b.meta.textContent = [m.model, usageText(m.usage), fmtTime(m.createTime ? timestampDate(m.createTime) : undefined)]
      .filter(Boolean)
      .join(" · ");
    setStatus(b, m.status, m.errorReason);
    return b;
  }

  function renderActions(b: Bubble): void {
    b.actions.replaceChildren();
    const m = b.message;
    if (b.role !== MessageRole.ASSISTANT || !m || b.status === MessageStatus.GENERATING) return;
    const rating = m.feedback?.rating ?? FeedbackRating.UNSPECIFIED;
    const rate = (r: FeedbackRating) => async () => {
      try {
        const next = rating === r ? FeedbackRating.UNSPECIFIED : r;
        const res = await api.call((o) => api.chat.submitFeedback({ messageId: b.id, rating: next }, o), ac.signal);
        if (res.message) b.message = res.message;
        renderActions(b);
      } catch (err) {
        ctx.showError(err);
      }
    };
    b.actions.append(
      h("button", { class: "icon", title: "Good reply", testid: "feedback-up", "aria-pressed": String(rating === FeedbackRating.UP), onclick: rate(FeedbackRating.UP) }, "▲"),
      h("button", { class: "icon", title: "Bad reply", testid: "feedback-down", "aria-pressed": String(rating === FeedbackRating.DOWN), onclick: rate(FeedbackRating.DOWN) }, "▼"),
      h("button", { class: "link", testid: "regenerate", disabled: sending, onclick: () => void regenerate(b) }, "Regenerate"),
    );
  }

  function updateComposer(): void {
    const generating = live !== null && live.status === MessageStatus.GENERATING;
    stopBtn.hidden = !generating;
    stopBtn.disabled = false;
    sendBtn.disabled = sending || generating;
  }

  function savePending(b: Bubble): void {
    if (b.status !== MessageStatus.GENERATING || !threadId) return;
    try {
      sessionStorage.setItem(PENDING + b.id, JSON.stringify({ threadId, seq: b.seq.toString(), text: b.text } satisfies Pending));
    } catch {
      // Storage full or disabled: a resume then replays the reply from its start.
    }
  }

  // -- reply events ---------------------------------------------------------------------------------
  function handle(res: ReplyResponse): void {
    const ev = res.event;
    if (ev.case === "userMessageSaved") {
      const t = ev.value.thread;
      if (t && t.id !== threadId) {
        threadId = t.id;
        history.replaceState(null, "", `${location.search}#/chat/${t.id}`); // a reload now reopens this thread
        renameBtn.hidden = deleteBtn.hidden = false;
        title.textContent = t.title || "Untitled";
      }
      if (t) upsertThread(t);
      const m = ev.value.message;
      if (m) {
        const optimistic = messagesEl.querySelector<HTMLElement>('article[data-status="sending"]');
        if (optimistic && !bubbles.has(m.id)) {
          bubbles.delete(optimistic.dataset.messageId ?? "");
          optimistic.remove();
        }
        showMessage(m);
      }
      return;
    }
    if (ev.case === undefined) return;
    let b = bubbles.get(res.messageId);
    if (b?.replaceOnFirstEvent) {
      b.replaceOnFirstEvent = false;
      setText(b, "");
      b.seq = 0n;
    }
    if (ev.case === "messageCompleted") {
      const m = ev.value.message;
      if (m) b = showMessage(m, res.seq > (b?.seq ?? 0n) ? res.seq : b?.seq);
      if (b) finish(b);
      return;
    }
    if (b && res.seq <= b.seq) return; // already seen (a replay overlapping what we have)
    switch (ev.case) {
      case "messageStarted": {
        const m = ev.value.message;
        if (m) b = showMessage(m, res.seq);
        if (b && replacing && replacing !== b) {
          replacing.el.replaceWith(b.el); // the new reply is the thread's active branch now
          bubbles.delete(replacing.id);
          replacing = null;
        }
        if (b) {
          live = b;
          savePending(b);
          updateComposer();
        }
        break;
      }
      case "textDelta":
        if (!b) {
          b = newBubble(res.messageId, MessageRole.ASSISTANT);
          setStatus(b, MessageStatus.GENERATING);
        }
        if (b.status !== MessageStatus.GENERATING) return; // stopped: late tokens are not shown
        setText(b, b.text + ev.value.text);
        b.seq = res.seq;
        savePending(b);
        messagesEl.scrollTop = messagesEl.scrollHeight;
        break;
      case "usageReported":
        if (b) {
          b.seq = res.seq;
          b.meta.textContent = usageText(ev.value.usage);
          savePending(b);
        }
        break;
      case "threadTitleSet":
        setThreadTitle(ev.value.threadId, ev.value.title);
        if (b) {
          b.seq = res.seq;
          savePending(b);
        }
        break;
    }
  }

  function finish(b: Bubble): void {
    sessionStorage.removeItem(PENDING + b.id);
    if (live === b) live = null;
    updateComposer();
  }

  /** Follows a reply with WatchMessage until it finishes, reconnecting after transient failures. */
  async function follow(b: Bubble): Promise<void> {
    for (let attempt = 0; attempt < RESUME_ATTEMPTS && b.status === MessageStatus.GENERATING; attempt++) {
      if (attempt > 0) await new Promise((r) => setTimeout(r, 400 * attempt));
      if (ac.signal.aborted) return;
      try {
        const afterSeq = b.replaceOnFirstEvent ? 0n : b.seq;
        for await (const res of api.stream((o) => api.chat.watchMessage({ messageId: b.id, afterSeq }, o), ac.signal)) {
          handle(res);
        }
      } catch (err) {
        if (ac.signal.aborted) return;
        if (!transient(err)) {
          ctx.showError(err);
          return;
        }
      }
    }
  }

  /** Consumes a SendMessage/RegenerateMessage stream; if the connection drops mid-reply, follows the reply. */
  async function run(open: () => AsyncIterable<ReplyResponse>): Promise<void> {
    const before = live;
    try {
      for await (const res of open()) handle(res);
    } catch (err) {
      if (ac.signal.aborted) return;
      const b = live !== before ? live : null;
      if (b && b.status === MessageStatus.GENERATING && transient(err)) {
        await follow(b);
        return;
      }
      ctx.showError(err);
      if (b && b.status === MessageStatus.GENERATING) {
        setStatus(b, MessageStatus.FAILED, describeError(err).reason ?? "");
        finish(b);
      }
      messagesEl.querySelector<HTMLElement>('article[data-status="sending"]')?.setAttribute("data-status", "failed");
    }
  }

  async function send(content: string): Promise<void> {
    sending = true;
    updateComposer();
    ctx.clearError();
    messagesEl.querySelector('[data-testid="chat-empty"]')?.remove();
    const optimistic = newBubble(`pending-${crypto.randomUUID()}`, MessageRole.USER);
    setText(optimistic, content);
    optimistic.el.dataset.status = "sending";
    messagesEl.scrollTop = messagesEl.scrollHeight;
    const clientMessageId = crypto.randomUUID(); // makes a retried send idempotent
    try {
      await run(() =>
        api.stream((o) => api.chat.sendMessage({ threadId, content, clientMessageId }, o), ac.signal),
      );
    } finally {
      sending = false;
      updateComposer();
      for (const b of bubbles.values()) renderActions(b);
    }
  }

  async function regenerate(old: Bubble): Promise<void> {
    sending = true;
    replacing = old;
    updateComposer();
    ctx.clearError();
    try {
      await run(() => api.stream((o) => api.chat.regenerateMessage({ messageId: old.id }, o), ac.signal));
    } finally {
      sending = false;
      replacing = null;
      updateComposer();
      for (const b of bubbles.values()) renderActions(b);
    }
  }

  // -- the open thread ------------------------------------------------------------------------------
  async function loadThread(): Promise<void> {
    if (!threadId) {
      title.textContent = "New chat";
      messagesEl.append(h("p", { class: "empty", testid: "chat-empty" }, "Ask anything. Your first message starts a thread."));
      return;
    }
    try {
      const [threadRes, messages] = await Promise.all([
        api.call((o) => api.chat.getThread({ threadId }, o), ac.signal),
        (async () => {
          const all: Message[] = [];
          let pageToken = "";
          for (let page = 0; page < 50; page++) {
            const res = await api.call((o) => api.chat.listMessages({ threadId, pageSize: 200, pageToken }, o), ac.signal);
            all.push(...res.messages);
            pageToken = res.nextPageToken;
            if (!pageToken) break;
          }
          return all;
        })(),
      ]);
      title.textContent = threadRes.thread?.title || "Untitled";
      clear(messagesEl);
      const unfinished: Bubble[] = [];
      for (const m of messages) {
        const b = showMessage(m);
        if (m.role === MessageRole.ASSISTANT && m.status === MessageStatus.GENERATING) {
          const pending = loadPending(m.id);
          if (pending) {
            setText(b, pending.text);
            b.seq = BigInt(pending.seq);
          } else {
            b.replaceOnFirstEvent = true; // replay the whole reply from seq 0
          }
          unfinished.push(b);
        }
      }
      messagesEl.scrollTop = messagesEl.scrollHeight;
      for (const b of unfinished) {
        live = b;
        updateComposer();
        void follow(b);
      }
    } catch (err) {
      if (ac.signal.aborted) return;
      ctx.showError(err);
      if (describeError(err).code === "NOT_FOUND") title.textContent = "Thread not found";
    }
  }

  // -- controls -------------------------------------------------------------------------------------
  composer.addEventListener("submit", (e) => {
    e.preventDefault();
    const content = input.value.trim();
    if (!content || sendBtn.disabled) return;
    input.value = "";
    void send(content);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      composer.requestSubmit();
    }
  });
  stopBtn.addEventListener("click", async () => {
    const b = live;
    if (!b) return;
    stopBtn.disabled = true;
    try {
      const res = await api.call((o) => api.chat.cancelGeneration({ messageId: b.id }, o), ac.signal);
      if (res.message) showMessage(res.message, b.seq);
      finish(b);
    } catch (err) {
      if (describeError(err).reason !== "GENERATION_NOT_ACTIVE") ctx.showError(err);
      stopBtn.disabled = false;
    }
  });
  renameBtn.addEventListener("click", () => {
    const field = h("input", { type: "text", value: title.textContent ?? "", maxlength: 200, testid: "thread-title-input" });
    let finished = false;
    const done = async (save: boolean) => {
      if (finished) return; // Enter, then the blur of the removed field
      finished = true;
      if (save && field.value.trim() && field.value.trim() !== title.textContent) {
        try {
          const res = await api.call(
            (o) => api.chat.updateThread({ thread: { id: threadId, title: field.value.trim() }, updateMask: { paths: ["title"] } }, o),
            ac.signal,
          );
          if (res.thread) {
            setThreadTitle(res.thread.id, res.thread.title);
            upsertThread(res.thread);
          }
        } catch (err) {
          ctx.showError(err);
        }
      }
      field.replaceWith(title);
    };
    field.addEventListener("keydown", (e) => {
      if (e.key === "Enter") void done(true);
      if (e.key === "Escape") void done(false);
    });
    field.addEventListener("blur", () => void done(true), { once: true });
    title.replaceWith(field);
    field.focus();
  });
  deleteBtn.addEventListener("click", async () => {
    if (!confirm("Delete this thread and all its messages?")) return;
    try {
      await api.call((o) => api.chat.deleteThread({ threadId }, o), ac.signal);
      ctx.navigate("#/chat");
      void loadThreads();
    } catch (err) {
      ctx.showError(err);
    }
  });

  void loadThreads();
  void loadThread();
  updateComposer();
  input.focus();
  return () => ac.abort();
}
