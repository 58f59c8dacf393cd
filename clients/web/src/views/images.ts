// Images: GenerateImage streams progress and previews, then the stored image, which the page loads
// from its signed image_url (served by the gateway, no bearer token needed). A gallery of past images.
import { clear, h } from "../dom";
import { describeError } from "../errors";
import { type Image, ImageStatus } from "../gen/everything/image/v1/image_pb";
import type { Ctx, Unmount } from "../main";

const SIZES = ["256x256", "512x512", "1024x1024", "1024x1536", "1536x1024"];

export function imagesView(root: HTMLElement, ctx: Ctx): Unmount {
  const { api } = ctx;
  const ac = new AbortController();
  const blobUrls: string[] = [];

  const prompt = h("textarea", { rows: 3, maxlength: 4000, required: true, placeholder: "Describe the image…", testid: "image-prompt" });
  const size = h(
    "select",
    { testid: "image-size" },
    h("option", { value: "" }, "size: my default"),
    SIZES.map((s) => h("option", { value: s }, s)),
  );
  const partials = h(
    "select",
    { testid: "image-partials", title: "Previews while drawing" },
    [0, 1, 2, 3].map((n) => h("option", { value: String(n) }, `${n} preview${n === 1 ? "" : "s"}`)),
  );
  partials.value = "2";
  const generate = h("button", { type: "submit", class: "primary", testid: "image-generate" }, "Generate");
  const progress = h("progress", { max: 100, value: 0, testid: "image-progress", hidden: true });
  const stage = h("span", { class: "status", testid: "image-stage" });
  const previews = h("div", { class: "previews", testid: "image-previews" });
  const result = h("div", { class: "result", testid: "image-result-box" });
  const gallery = h("div", { class: "gallery", testid: "image-gallery" });

  root.append(
    h("form", { class: "image-form", testid: "image-form", onsubmit: (e: Event) => void onSubmit(e) }, prompt, h("div", { class: "row" }, size, partials, generate)),
    h("div", { class: "row" }, progress, stage),
    previews,
    result,
    h("h3", null, "Your images"),
    gallery,
  );

  /** An <img> of a stored image; an expired signed link is replaced once with a fresh one (GetImage). */
  function picture(img: Image, testid: string): HTMLImageElement {
    const el = h("img", { src: img.imageUrl, alt: img.revisedPrompt || img.prompt, testid, "data-image-id": img.id, loading: "lazy", decoding: "async" });
    el.addEventListener(
      "error",
      async () => {
        try {
          const res = await api.call((o) => api.image.getImage({ imageId: img.id }, o), ac.signal);
          if (res.image?.imageUrl) el.src = res.image.imageUrl;
        } catch (err) {
          ctx.showError(err);
        }
      },
      { once: true },
    );
    return el;
  }

  function card(img: Image): HTMLElement {
    return h(
      "figure",
      { "data-image-id": img.id, testid: "gallery-item" },
      img.status === ImageStatus.COMPLETED && img.imageUrl
        ? picture(img, "gallery-image")
        : h("div", { class: "placeholder" }, img.status === ImageStatus.FAILED ? `failed: ${img.errorReason}` : "drawing…"),
      h(
        "figcaption",
        null,
        h("span", null, img.prompt),
        h("small", null, ` ${img.size}`),
        h("button", { class: "link danger", title: "Delete", testid: "image-delete", onclick: () => void remove(img.id) }, "×"),
      ),
    );
  }

  async function remove(id: string): Promise<void> {
    try {
      await api.call((o) => api.image.deleteImage({ imageId: id }, o), ac.signal);
      root.querySelectorAll(`[data-image-id="${CSS.escape(id)}"]`).forEach((el) => el.closest("figure")?.remove());
    } catch (err) {
      ctx.showError(err);
    }
  }

  async function loadGallery(): Promise<void> {
    try {
      const res = await api.call((o) => api.image.listImages({ pageSize: 24 }, o), ac.signal);
      clear(gallery, res.images.map(card));
    } catch (err) {
      if (!ac.signal.aborted) ctx.showError(err);
    }
  }

  async function onSubmit(e: Event): Promise<void> {
    e.preventDefault();
    if (!prompt.value.trim()) return;
    ctx.clearError();
    generate.disabled = true;
    progress.hidden = false;
    progress.value = 0;
    stage.textContent = "starting…";
    clear(previews);
    clear(result);
    try {
      const stream = api.stream(
        (o) =>
          api.image.generateImage(
            { prompt: prompt.value.trim(), size: size.value, partialImages: Number(partials.value), clientRequestId: crypto.randomUUID() },
            o,
          ),
        ac.signal,
      );
      for await (const res of stream) {
        const ev = res.event;
        switch (ev.case) {
          case "started":
            stage.textContent = "queued";
            break;
          case "progress":
            progress.value = ev.value.percent;
            stage.textContent = `${ev.value.stage} ${ev.value.percent}%`;
            break;
          case "partialImage": {
            const url = URL.createObjectURL(new Blob([ev.value.data as Uint8Array<ArrayBuffer>], { type: ev.value.contentType || "image/png" }));
            blobUrls.push(url);
            previews.append(h("img", { src: url, alt: `preview ${ev.value.index + 1}`, testid: "image-preview" }));
            break;
          }
          case "completed": {
            const img = ev.value.image;
            if (!img) break;
            progress.value = 100;
            if (img.status === ImageStatus.COMPLETED) {
              stage.textContent = "done";
              result.append(
                h(
                  "figure",
                  null,
                  picture(img, "image-result"),
                  h("figcaption", null, img.revisedPrompt || img.prompt, h("small", null, ` ${img.size} · ${img.contentType} · ${img.byteSize} bytes`)),
                ),
              );
            } else {
              stage.textContent = `failed: ${img.errorReason}`;
            }
            gallery.querySelector(`figure[data-image-id="${CSS.escape(img.id)}"]`)?.remove();
            gallery.prepend(card(img));
            break;
          }
        }
      }
    } catch (err) {
      if (!ac.signal.aborted) {
        ctx.showError(err);
        stage.textContent = `failed: ${describeError(err).reason ?? describeError(err).code}`;
      }
    } finally {
      generate.disabled = false;
    }
  }

  void loadGallery();
  prompt.focus();
  return () => {
    ac.abort();
    for (const u of blobUrls) URL.revokeObjectURL(u);
  };
}
