// Sign in / sign up. Field errors from the server's BadRequest show under the field they name.
import { h } from "../dom";
import { describeError, formatError } from "../errors";
import type { Ctx } from "../main";

export function authView(root: HTMLElement, ctx: Ctx): void {
  let mode: "signin" | "signup" = "signin";

  const title = h("h1", { testid: "auth-title" });
  const email = h("input", { type: "email", name: "email", autocomplete: "username", required: true, testid: "auth-email" });
  const password = h("input", {
    type: "password",
    name: "password",
    autocomplete: "current-password",
    required: true,
    minlength: 10,
    testid: "auth-password",
  });
  const displayName = h("input", { type: "text", name: "display_name", maxlength: 100, testid: "auth-display-name" });
  const fieldErr = {
    email: h("small", { class: "field-error", testid: "auth-error-email" }),
    password: h("small", { class: "field-error", testid: "auth-error-password" }),
    display_name: h("small", { class: "field-error", testid: "auth-error-display_name" }),
  };
  const nameRow = h("label", null, "Name (optional)", displayName, fieldErr.display_name);
  const error = h("p", { class: "form-error", testid: "auth-error", role: "alert" });
  const submit = h("button", { type: "submit", class: "primary", testid: "auth-submit" });
  const toggle = h("button", { type: "button", class: "link", testid: "auth-mode-toggle", onclick: () => setMode(mode === "signin" ? "signup" : "signin") });

  function setMode(m: typeof mode): void {
    mode = m;
    title.textContent = m === "signin" ? "Sign in" : "Create an account";
    submit.textContent = m === "signin" ? "Sign in" : "Sign up";
    toggle.textContent = m === "signin" ? "No account yet? Sign up" : "Have an account? Sign in";
    password.autocomplete = m === "signin" ? "current-password" : "new-password";
    nameRow.hidden = m === "signin";
    error.textContent = "";
  }

  async function onSubmit(e: Event): Promise<void> {
    e.preventDefault();
    error.textContent = "";
    for (const el of Object.values(fieldErr)) el.textContent = "";
    submit.disabled = true;
    try {
      const res =
        mode === "signin"
          ? await ctx.api.auth.signIn({ email: email.value, password: password.value })
          : await ctx.api.auth.signUp({ email: email.value, password: password.value, displayName: displayName.value });
      ctx.api.signedIn(res.user, res.tokens);
      ctx.navigate("#/chat");
    } catch (err) {
      const v = describeError(err);
      for (const f of v.fields) {
        const slot = fieldErr[f.field as keyof typeof fieldErr];
        if (slot) slot.textContent = f.description;
      }
      error.dataset.reason = v.reason ?? "";
      error.textContent = formatError(err);
    } finally {
      submit.disabled = false;
    }
  }

  root.append(
    h(
      "form",
      { class: "card auth", testid: "auth-form", onsubmit: (e: Event) => void onSubmit(e) },
      title,
      h("label", null, "Email", email, fieldErr.email),
      h("label", null, "Password", password, fieldErr.password),
      nameRow,
      error,
      h("div", { class: "row" }, submit, toggle),
    ),
  );
  setMode("signin");
  email.focus();
}
