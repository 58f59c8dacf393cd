// Boot, the app shell (header, navigation, error banner) and a hash router:
//   #/signin  #/chat  #/chat/<thread id>  #/search  #/search/<search id>  #/images  #/prefs
import "./style.css";
import { Api } from "./api";
import { apiBaseUrl } from "./config";
import { clear, h } from "./dom";
import { describeError, formatError, isCancel } from "./errors";
import { Theme } from "./gen/everything/preferences/v1/preferences_pb";
import { authView } from "./views/auth";
import { chatView } from "./views/chat";
import { imagesView } from "./views/images";
import { prefsView } from "./views/prefs";
import { searchView } from "./views/search";

export interface Ctx {
  api: Api;
  /** Shows an error in the banner (ignores cancellations, which the user caused). */
  showError(err: unknown): void;
  clearError(): void;
  navigate(hash: string): void;
  applyTheme(theme: Theme): void;
  refreshUser(): void;
}

export type Unmount = () => void;
export type View = (root: HTMLElement, ctx: Ctx, params: string[]) => Unmount | void;

const ROUTES: Record<string, View> = {
  signin: authView,
  chat: chatView,
  search: searchView,
  images: imagesView,
  prefs: prefsView,
};

const NAV: [string, string][] = [
  ["chat", "Chat"],
  ["search", "Search"],
  ["images", "Images"],
  ["prefs", "Preferences"],
];

async function boot(): Promise<void> {
  const app = document.getElementById("app")!;
  let api: Api;
  try {
    api = new Api(await apiBaseUrl());
  } catch (err) {
    clear(app, h("p", { class: "banner", testid: "error-banner" }, String(err)));
    return;
  }

  const banner = h("div", { class: "banner", testid: "error-banner", role: "alert", hidden: true });
  const bannerText = h("pre", { testid: "error-text" });
  banner.append(bannerText, h("button", { class: "link", onclick: () => ctx.clearError(), "aria-label": "Dismiss" }, "×"));
  const userLabel = h("span", { class: "user", testid: "current-user" });
  const nav = h(
    "nav",
    null,
    NAV.map(([route, label]) => h("a", { href: `#/${route}`, testid: `nav-${route}`, "data-route": route }, label)),
  );
  const signOut = h("button", { class: "link", testid: "sign-out", onclick: () => void api.signOut() }, "Sign out");
  const header = h(
    "header",
    null,
    h("a", { class: "brand", href: "#/chat" }, "everything"),
    nav,
    h("span", { class: "spacer" }),
    userLabel,
    signOut,
  );
  const main = h("main", { id: "view" });
  clear(app, header, banner, main);

  const ctx: Ctx = {
    api,
    showError(err) {
      if (isCancel(err)) return;
      const v = describeError(err);
      banner.dataset.code = v.code;
      banner.dataset.reason = v.reason ?? "";
      bannerText.textContent = formatError(err);
      banner.hidden = false;
      console.warn("call failed", v);
    },
    clearError() {
      banner.hidden = true;
      bannerText.textContent = "";
    },
    navigate(hash) {
      if (location.hash === hash) route();
      else location.hash = hash;
    },
    applyTheme(theme) {
      const name = theme === Theme.LIGHT ? "light" : theme === Theme.DARK ? "dark" : "system";
      document.documentElement.dataset.theme = name;
    },
    refreshUser() {
      const s = api.session;
      userLabel.textContent = s ? s.displayName || s.email : "";
      header.hidden = !s;
    },
  };

  let unmount: Unmount | void;
  let signedOutNotice = "";
  function route(): void {
    const [name = "", ...params] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    const signedIn = api.session !== null;
    if (!signedIn && name !== "signin") {
      location.replace("#/signin");
      return;
    }
    if (signedIn && (name === "signin" || !ROUTES[name])) {
      location.replace("#/chat");
      return;
    }
    if (unmount) unmount();
    unmount = undefined;
    ctx.clearError();
    ctx.refreshUser();
    for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.dataset.route === name);
    const root = h("section", { class: `view view-${name}`, testid: `view-${name}` });
    clear(main, root);
    if (name === "signin" && signedOutNotice) {
      root.append(h("p", { class: "notice", testid: "signed-out-notice" }, signedOutNotice));
      signedOutNotice = "";
    }
    unmount = ROUTES[name](root, ctx, params);
  }

  api.onSignedOut((why) => {
    signedOutNotice = why === "signed out" ? "" : `You were signed out (${why}).`;
    ctx.navigate("#/signin");
  });
  window.addEventListener("hashchange", route);
  window.addEventListener("storage", (e) => {
    // Signed in or out in another tab.
    if (e.key === "everything.session" && (e.oldValue === null) !== (e.newValue === null)) route();
  });
  route();

  if (api.session) {
    // Check the stored session (this refreshes an expired access token), then apply the theme.
    api
      .call((o) => api.auth.getCurrentUser({}, o))
      .then(() => api.call((o) => api.prefs.getPreferences({}, o)))
      .then((res) => ctx.applyTheme(res.preferences?.theme ?? Theme.UNSPECIFIED))
      .catch((err) => {
        if (describeError(err).code !== "UNIMPLEMENTED") ctx.showError(err);
      });
  }
}

void boot();
