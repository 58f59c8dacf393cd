// Search: streams the numbered sources, then a summary whose [n] citations point at them.
// Past searches are listed beside it (#/search/<id> opens one).
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { clear, fmtTime, h } from "../dom";
import { describeError } from "../errors";
import { type SearchRecord, SearchStatus, type Source } from "../gen/everything/search/v1/search_pb";
import type { Ctx, Unmount } from "../main";

const STATUS: Record<SearchStatus, string> = {
  [SearchStatus.UNSPECIFIED]: "",
  [SearchStatus.RUNNING]: "running",
  [SearchStatus.COMPLETED]: "completed",
  [SearchStatus.CANCELLED]: "cancelled",
  [SearchStatus.FAILED]: "failed",
};

/** A source's link: web pages open in a new tab; everything:thread/<id> opens the thread here. */
function sourceHref(url: string): { href: string; external: boolean } | null {
  const own = /^everything:thread\/([0-9a-fA-F-]{36})$/.exec(url);
  if (own) return { href: `#/chat/${own[1]}`, external: false };
  try {
    const u = new URL(url);
    return u.protocol === "http:" || u.protocol === "https:" ? { href: u.href, external: true } : null;
  } catch {
    return null;
  }
}

export function searchView(root: HTMLElement, ctx: Ctx, params: string[]): Unmount {
  const { api } = ctx;
  const ac = new AbortController();
  let current = ""; // id of the search on screen
  let running = false;

  const query = h("input", { type: "search", placeholder: "Search the web and your history…", maxlength: 2000, required: true, testid: "search-input" });
  const providers = h("input", { type: "text", placeholder: "providers (default: your preferences)", testid: "search-providers", title: "Comma-separated: searxng, brave, tavily, history" });
  const submit = h("button", { type: "submit", class: "primary", testid: "search-submit" }, "Search");
  const stop = h("button", { type: "button", class: "danger", hidden: true, testid: "search-stop" }, "Stop");
  const status = h("p", { class: "status", testid: "search-status" });
  const sources = h("ol", { class: "sources", testid: "search-sources" });
  const summary = h("div", { class: "summary", testid: "search-summary" });
  const history = h("ul", { class: "history", testid: "search-history" });
  let summaryText = "";
  let sourceList: Source[] = [];

  root.append(
    h(
      "div",
      { class: "search-layout" },
      h(
        "section",
        null,
        h("form", { class: "search-form", testid: "search-form", onsubmit: (e: Event) => void onSubmit(e) }, query, providers, submit, stop),
        status,
        h("h3", null, "Sources"),
        sources,
        h("h3", null, "Summary"),
        summary,
      ),
      h("aside", { class: "sidebar" }, h("h3", null, "Past searches"), history),
    ),
  );

  function renderSources(list: Source[]): void {
    sourceList = [...list].sort((a, b) => a.index - b.index);
    clear(
      sources,
      sourceList.map((s) => {
        const link = sourceHref(s.url);
        return h(
          "li",
          { id: `source-${s.index}`, value: s.index, testid: "search-source", "data-index": s.index, "data-provider": s.provider },
          h("span", { class: "num" }, `[${s.index}]`),
          " ",
          link
            ? h("a", { href: link.href, target: link.external ? "_blank" : null, rel: link.external ? "noopener noreferrer" : null }, s.title || s.url)
            : h("span", null, s.title || s.url),
          h("small", { class: "provider" }, ` · ${s.provider}`),
          s.snippet ? h("p", { class: "snippet" }, s.snippet) : null,
        );
      }),
    );
    renderSummary();
  }

  /** The summary as text nodes, with each [n] as a citation that highlights source n. */
  function renderSummary(): void {
    const parts: (Node | string)[] = [];
    let last = 0;
    for (const m of summaryText.matchAll(/\[(\d{1,2})\]/g)) {
      const n = Number(m[1]);
      parts.push(summaryText.slice(last, m.index));
      const known = sourceList.some((s) => s.index === n);
      parts.push(
        known
          ? h(
              "sup",
              null,
              h(
                "button",
                {
                  class: "cite",
                  testid: "citation",
                  "data-index": n,
                  onclick: () => {
                    const el = sources.querySelector<HTMLElement>(`li[data-index="${n}"]`);
                    el?.scrollIntoView({ block: "nearest" });
                    el?.classList.add("flash");
                    setTimeout(() => el?.classList.remove("flash"), 1200);
                  },
                },
                `[${n}]`,
              ),
            )
          : m[0],
      );
      last = (m.index ?? 0) + m[0].length;
    }
    parts.push(summaryText.slice(last));
    clear(summary, parts);
  }

  function showRecord(r: SearchRecord): void {
    current = r.id;
    query.value = r.query;
    summaryText = r.summary;
    renderSources(r.sources);
    setStatus(r.status, r.errorReason);
  }

  function setStatus(s: SearchStatus, reason = ""): void {
    status.dataset.status = STATUS[s];
    status.textContent = s === SearchStatus.RUNNING ? "Searching…" : STATUS[s] + (reason ? `: ${reason}` : "");
  }

  function historyItem(r: SearchRecord): HTMLElement {
    return h(
      "li",
      { "data-search-id": r.id },
      h("a", { href: `#/search/${r.id}`, testid: "search-history-item" }, r.query),
      h("small", null, fmtTime(r.createTime ? timestampDate(r.createTime) : undefined)),
      h("button", { class: "link danger", title: "Delete", testid: "search-delete", onclick: () => void remove(r.id) }, "×"),
    );
  }

  async function remove(id: string): Promise<void> {
    try {
      await api.call((o) => api.search.deleteSearch({ searchId: id }, o), ac.signal);
      history.querySelector(`li[data-search-id="${CSS.escape(id)}"]`)?.remove();
      if (id === current) ctx.navigate("#/search");
    } catch (err) {
      ctx.showError(err);
    }
  }

  async function loadHistory(): Promise<void> {
    try {
      const res = await api.call((o) => api.search.listSearches({ pageSize: 30 }, o), ac.signal);
      clear(history, res.searches.map(historyItem));
    } catch (err) {
      if (!ac.signal.aborted) ctx.showError(err);
    }
  }

  async function onSubmit(e: Event): Promise<void> {
    e.preventDefault();
    if (running || !query.value.trim()) return;
    running = true;
    ctx.clearError();
    submit.disabled = true;
    stop.hidden = false;
    summaryText = "";
    renderSources([]);
    setStatus(SearchStatus.RUNNING);
    const chosen = providers.value.split(",").map((p) => p.trim()).filter(Boolean);
    try {
      const stream = api.stream(
        (o) => api.search.search({ query: query.value.trim(), providers: chosen, clientRequestId: crypto.randomUUID() }, o),
        ac.signal,
      );
      for await (const res of stream) {
        const ev = res.event;
        switch (ev.case) {
          case "started":
            current = res.searchId;
            history.querySelector(`li[data-search-id="${CSS.escape(res.searchId)}"]`)?.remove();
            if (ev.value.search) history.prepend(historyItem(ev.value.search));
            break;
          case "sourcesFound":
            renderSources(ev.value.sources);
            break;
          case "summaryDelta":
            summaryText += ev.value.text;
            renderSummary();
            break;
          case "completed":
            if (ev.value.search) showRecord(ev.value.search);
            break;
        }
      }
    } catch (err) {
      if (!ac.signal.aborted) {
        ctx.showError(err);
        setStatus(SearchStatus.FAILED, describeError(err).reason ?? "");
      }
    } finally {
      running = false;
      submit.disabled = false;
      stop.hidden = true;
    }
  }

  stop.addEventListener("click", async () => {
    if (!current) return;
    try {
      const res = await api.call((o) => api.search.cancelSearch({ searchId: current }, o), ac.signal);
      if (res.search) showRecord(res.search);
    } catch (err) {
      if (describeError(err).reason !== "GENERATION_NOT_ACTIVE") ctx.showError(err);
    }
  });

  void loadHistory();
  if (params[0]) {
    api
      .call((o) => api.search.getSearch({ searchId: params[0] }, o), ac.signal)
      .then((res) => res.search && showRecord(res.search))
      .catch((err) => ctx.showError(err));
  }
  query.focus();
  return () => ac.abort();
}
