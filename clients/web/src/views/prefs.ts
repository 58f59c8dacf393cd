// Preferences: GetPreferences fills the form; Save sends only the changed fields, named in the
// update mask by their proto names, so settings changed elsewhere meanwhile are not overwritten.
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { JsonObject } from "@bufbuild/protobuf";
import { fmtTime, h } from "../dom";
import { describeError, formatError } from "../errors";
import { type Preferences, Theme } from "../gen/everything/preferences/v1/preferences_pb";
import type { Ctx, Unmount } from "../main";

type Field =
  | "chat_model"
  | "system_prompt"
  | "temperature"
  | "image_model"
  | "image_size"
  | "search_providers"
  | "theme"
  | "locale"
  | "client_settings";

/** The form's value of each field, in the shape of Preferences (undefined temperature = not set). */
type Values = Pick<
  Preferences,
  "chatModel" | "systemPrompt" | "temperature" | "imageModel" | "imageSize" | "searchProviders" | "theme" | "locale" | "clientSettings"
>;

const KEYS: Record<Field, keyof Values> = {
  chat_model: "chatModel",
  system_prompt: "systemPrompt",
  temperature: "temperature",
  image_model: "imageModel",
  image_size: "imageSize",
  search_providers: "searchProviders",
  theme: "theme",
  locale: "locale",
  client_settings: "clientSettings",
};

function same(a: unknown, b: unknown): boolean {
  return JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
}

export function prefsView(root: HTMLElement, ctx: Ctx): Unmount {
  const { api } = ctx;
  const ac = new AbortController();
  let loaded: Values | null = null;

  const inputs = {
    chat_model: h("input", { type: "text", maxlength: 100, placeholder: "server default", testid: "pref-chat_model" }),
    system_prompt: h("textarea", { rows: 4, maxlength: 8000, testid: "pref-system_prompt" }),
    temperature: h("input", { type: "number", min: 0, max: 2, step: 0.1, placeholder: "model default", testid: "pref-temperature" }),
    image_model: h("input", { type: "text", maxlength: 100, placeholder: "server default", testid: "pref-image_model" }),
    image_size: h(
      "select",
      { testid: "pref-image_size" },
      ["", "256x256", "512x512", "1024x1024", "1024x1536", "1536x1024"].map((s) => h("option", { value: s }, s || "server default")),
    ),
    search_providers: h("input", { type: "text", placeholder: "searxng, history", testid: "pref-search_providers" }),
    theme: h(
      "select",
      { testid: "pref-theme" },
      h("option", { value: String(Theme.UNSPECIFIED) }, "not set"),
      h("option", { value: String(Theme.SYSTEM) }, "system"),
      h("option", { value: String(Theme.LIGHT) }, "light"),
      h("option", { value: String(Theme.DARK) }, "dark"),
    ),
    locale: h("input", { type: "text", maxlength: 35, placeholder: "en-GB", testid: "pref-locale" }),
    client_settings: h("textarea", { rows: 4, spellcheck: false, class: "mono", placeholder: "{}", testid: "pref-client_settings" }),
  } satisfies Record<Field, HTMLInputElement | HTMLTextAreaElement | HTMLSelectElement>;
  const errors = Object.fromEntries(
    (Object.keys(inputs) as Field[]).map((f) => [f, h("small", { class: "field-error", testid: `pref-error-${f}` })]),
  ) as Record<Field, HTMLElement>;
  const labels: Record<Field, string> = {
    chat_model: "Chat model",
    system_prompt: "System prompt",
    temperature: "Temperature (0–2)",
    image_model: "Image model",
    image_size: "Default image size",
    search_providers: "Search providers (comma-separated, in order)",
    theme: "Theme",
    locale: "Locale",
    client_settings: "Client settings (JSON object)",
  };
  const save = h("button", { type: "submit", class: "primary", testid: "pref-save", disabled: true }, "Save");
  const status = h("p", { class: "status", testid: "pref-status" });
  const updated = h("small", { testid: "pref-updated" });
  const form = h(
    "form",
    { class: "card prefs", testid: "pref-form", novalidate: true, onsubmit: (e: Event) => void onSave(e) },
    h("h2", null, "Preferences"),
    (Object.keys(inputs) as Field[]).map((f) => h("label", null, labels[f], inputs[f], errors[f])),
    h("div", { class: "row" }, save, status),
    updated,
  );
  root.append(form);

  function fill(p: Preferences): void {
    loaded = {
      chatModel: p.chatModel,
      systemPrompt: p.systemPrompt,
      temperature: p.temperature,
      imageModel: p.imageModel,
      imageSize: p.imageSize,
      searchProviders: [...p.searchProviders],
      theme: p.theme,
      locale: p.locale,
      clientSettings: p.clientSettings,
    };
    inputs.chat_model.value = p.chatModel;
    inputs.system_prompt.value = p.systemPrompt;
    inputs.temperature.value = p.temperature === undefined ? "" : String(p.temperature);
    inputs.image_model.value = p.imageModel;
    inputs.image_size.value = p.imageSize;
    inputs.search_providers.value = p.searchProviders.join(", ");
    inputs.theme.value = String(p.theme);
    inputs.locale.value = p.locale;
    inputs.client_settings.value = p.clientSettings && Object.keys(p.clientSettings).length ? JSON.stringify(p.clientSettings, null, 2) : "";
    updated.textContent = p.updateTime ? `Last changed ${fmtTime(timestampDate(p.updateTime))}` : "All defaults.";
    ctx.applyTheme(p.theme);
    save.disabled = false;
  }

  /** The form's values; throws (with the field) when one cannot be parsed. */
  function read(): Values {
    const temperature = inputs.temperature.value.trim();
    let clientSettings: JsonObject | undefined;
    const raw = inputs.client_settings.value.trim();
    if (raw) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(raw);
      } catch (err) {
        throw Object.assign(new Error(`not valid JSON: ${(err as Error).message}`), { field: "client_settings" });
      }
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
        throw Object.assign(new Error("must be a JSON object"), { field: "client_settings" });
      }
      clientSettings = parsed as JsonObject;
    }
    if (temperature && !Number.isFinite(Number(temperature))) {
      throw Object.assign(new Error("must be a number"), { field: "temperature" });
    }
    return {
      chatModel: inputs.chat_model.value.trim(),
      systemPrompt: inputs.system_prompt.value,
      temperature: temperature ? Number(temperature) : undefined,
      imageModel: inputs.image_model.value.trim(),
      imageSize: inputs.image_size.value,
      searchProviders: inputs.search_providers.value.split(",").map((s) => s.trim()).filter(Boolean),
      theme: Number(inputs.theme.value) as Theme,
      locale: inputs.locale.value.trim(),
      clientSettings: clientSettings ?? (loaded?.clientSettings && Object.keys(loaded.clientSettings).length ? {} : loaded?.clientSettings),
    };
  }

  async function onSave(e: Event): Promise<void> {
    e.preventDefault();
    if (!loaded) return;
    for (const el of Object.values(errors)) el.textContent = "";
    status.textContent = "";
    let values: Values;
    try {
      values = read();
    } catch (err) {
      const field = (err as { field?: Field }).field;
      if (field) errors[field].textContent = (err as Error).message;
      return;
    }
    const paths = (Object.keys(KEYS) as Field[]).filter((f) => !same(values[KEYS[f]], loaded![KEYS[f]]));
    if (!paths.length) {
      status.textContent = "Nothing changed.";
      return;
    }
    save.disabled = true;
    try {
      const res = await api.call(
        (o) => api.prefs.updatePreferences({ preferences: values, updateMask: { paths } }, o),
        ac.signal,
      );
      if (res.preferences) fill(res.preferences);
      status.textContent = `Saved (${paths.join(", ")}).`;
      status.dataset.saved = paths.join(",");
    } catch (err) {
      const v = describeError(err);
      let placed = false;
      for (const f of v.fields) {
        const name = f.field.replace(/^preferences\./, "") as Field;
        if (errors[name]) {
          errors[name].textContent = f.description;
          placed = true;
        }
      }
      if (!placed) ctx.showError(err);
      else status.textContent = formatError(err).split("\n")[0];
    } finally {
      save.disabled = false;
    }
  }

  api
    .call((o) => api.prefs.getPreferences({}, o), ac.signal)
    .then((res) => res.preferences && fill(res.preferences))
    .catch((err) => {
      if (!ac.signal.aborted) ctx.showError(err);
    });
  return () => ac.abort();
}
