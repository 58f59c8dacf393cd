// The gRPC-Web clients and the signed-in session.
//
// Tokens live in localStorage (so a reload or a second tab stays signed in). A call that fails with
// UNAUTHENTICATED / TOKEN_EXPIRED refreshes the access token with RefreshToken and is retried once.
// Refresh tokens rotate and a spent one revokes the whole session when presented again, so refreshes
// are single-flight: one in this tab (a shared promise) and one across tabs (a Web Lock), and a call
// whose token was already replaced by someone else's refresh just retries with the new one.
import { Code, ConnectError, createClient, type CallOptions, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AuthService } from "./gen/everything/auth/v1/auth_service_pb";
import type { Tokens, User } from "./gen/everything/auth/v1/auth_pb";
import { ChatService } from "./gen/everything/chat/v1/chat_service_pb";
import { ImageService } from "./gen/everything/image/v1/image_service_pb";
import { PreferencesService } from "./gen/everything/preferences/v1/preferences_service_pb";
import { SearchService } from "./gen/everything/search/v1/search_service_pb";
import { describeError } from "./errors";

const SESSION_KEY = "everything.session";

export interface StoredSession {
  accessToken: string;
  refreshToken: string;
  userId: string;
  email: string;
  displayName: string;
}

export type SignedOutListener = (why: string) => void;

export class Api {
  readonly auth: Client<typeof AuthService>;
  readonly chat: Client<typeof ChatService>;
  readonly search: Client<typeof SearchService>;
  readonly image: Client<typeof ImageService>;
  readonly prefs: Client<typeof PreferencesService>;
  private refreshing: Promise<void> | null = null;
  private signedOutListeners: SignedOutListener[] = [];

  constructor(readonly baseUrl: string) {
    const transport = createGrpcWebTransport({ baseUrl, useBinaryFormat: true });
    this.auth = createClient(AuthService, transport);
    this.chat = createClient(ChatService, transport);
    this.search = createClient(SearchService, transport);
    this.image = createClient(ImageService, transport);
    this.prefs = createClient(PreferencesService, transport);
  }

  // -- the session ------------------------------------------------------------------------------

  get session(): StoredSession | null {
    try {
      const raw = localStorage.getItem(SESSION_KEY);
      const s = raw ? (JSON.parse(raw) as StoredSession) : null;
      return s && typeof s.accessToken === "string" && typeof s.refreshToken === "string" ? s : null;
    } catch {
      return null;
    }
  }

  private save(s: StoredSession | null): void {
    if (s) localStorage.setItem(SESSION_KEY, JSON.stringify(s));
    else localStorage.removeItem(SESSION_KEY);
  }

  signedIn(user: User | undefined, tokens: Tokens | undefined): void {
    if (!user || !tokens) throw new ConnectError("the server sent no tokens", Code.Internal);
    this.save({
      accessToken: tokens.accessToken,
      refreshToken: tokens.refreshToken,
      userId: user.id,
      email: user.email,
      displayName: user.displayName,
    });
  }

  onSignedOut(listener: SignedOutListener): void {
    this.signedOutListeners.push(listener);
  }

  /** Forget the session locally (and tell the app), for example after SESSION_REVOKED. */
  dropSession(why: string): void {
    if (!this.session) return;
    this.save(null);
    for (const l of this.signedOutListeners) l(why);
  }

  async signOut(): Promise<void> {
    try {
      if (this.session) await this.call((o) => this.auth.signOut({}, o));
    } catch {
      // Signing out locally is what matters; the server session expires anyway.
    }
    this.dropSession("signed out");
  }

  // -- calls with the bearer token -------------------------------------------------------------

  private options(token: string | undefined, signal?: AbortSignal): CallOptions {
    return { headers: token ? { authorization: `Bearer ${token}` } : {}, signal };
  }

  /** A unary call with the access token; refreshed and retried once on TOKEN_EXPIRED. */
  async call<T>(fn: (opts: CallOptions) => Promise<T>, signal?: AbortSignal): Promise<T> {
    const used = this.session?.accessToken;
    try {
      return await fn(this.options(used, signal));
    } catch (err) {
      if (!(await this.recover(err, used))) throw err;
      return await fn(this.options(this.session?.accessToken, signal));
    }
  }

  /**
   * A server stream with the access token. The auth check fails before the first message, so only a
   * stream that failed before yielding anything is refreshed and opened again.
   */
  async *stream<T>(open: (opts: CallOptions) => AsyncIterable<T>, signal?: AbortSignal): AsyncGenerator<T> {
    for (let attempt = 0; ; attempt++) {
      const used = this.session?.accessToken;
      let received = false;
      try {
        for await (const msg of open(this.options(used, signal))) {
          received = true;
          yield msg;
        }
        return;
      } catch (err) {
        if (received || attempt > 0 || !(await this.recover(err, used))) throw err;
      }
    }
  }

  /** True when the failed call should be retried (the token was refreshed). */
  private async recover(err: unknown, used: string | undefined): Promise<boolean> {
    if (ConnectError.from(err).code !== Code.Unauthenticated) return false;
    const reason = describeError(err).reason;
    if (reason === "TOKEN_EXPIRED") {
      await this.refresh(used);
      return true;
    }
    if (reason === "SESSION_REVOKED" || reason === "TOKEN_INVALID" || reason === "TOKEN_MISSING") {
      // Another tab may have refreshed meanwhile: try its token before giving up.
      const current = this.session?.accessToken;
      if (current && current !== used) return true;
      this.dropSession(reason);
    }
    return false;
  }

  private async refresh(used: string | undefined): Promise<void> {
    if (!this.refreshing) {
      this.refreshing = this.withLock(() => this.refreshOnce(used)).finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  private async withLock(fn: () => Promise<void>): Promise<void> {
    const locks = (navigator as Navigator & { locks?: LockManager }).locks;
    if (!locks) return fn();
    return locks.request("everything.refresh", fn);
  }

  private async refreshOnce(used: string | undefined): Promise<void> {
    const s = this.session;
    if (!s) throw new ConnectError("not signed in", Code.Unauthenticated);
    if (s.accessToken !== used) return; // someone else refreshed already
    try {
      const res = await this.auth.refreshToken({ refreshToken: s.refreshToken });
      if (!res.tokens) throw new ConnectError("the server sent no tokens", Code.Internal);
      this.save({ ...s, accessToken: res.tokens.accessToken, refreshToken: res.tokens.refreshToken });
    } catch (err) {
      if (ConnectError.from(err).code === Code.Unauthenticated) {
        this.dropSession(describeError(err).reason ?? "session ended");
      }
      throw err;
    }
  }
}
