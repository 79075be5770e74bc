// Sending a plan's edits to the engine as they are typed.
//
// Every edit has a key (a field, `item:<id>.<key>`, ...). `edit` waits `EDIT_DEBOUNCE_MS` after the
// last keystroke of that key (or until `flush`, on blur) and sends only the latest value. All edits
// and structural changes (add, move, remove) go through one queue, so the engine sees them in the
// order the user made them. `state` says whether everything is acknowledged (保存済), still on its
// way (保存中) or failed; a field with an edit on its way is "dirty" and keeps its own text when the
// plan is reloaded, so a colleague's change never overwrites what is being typed.

/** How long after the last keystroke an edit is sent. */
export const EDIT_DEBOUNCE_MS = 400;

export type SaveState = 'saved' | 'saving' | 'failed';

interface Scheduled {
  timer: ReturnType<typeof setTimeout>;
  send: () => Promise<unknown>;
}

export class Saver {
  #scheduled = new Map<string, Scheduled>();
  #inflight = new Map<string, number>();
  #chain: Promise<unknown> = Promise.resolve();
  #idle: (() => void)[] = [];
  #s = $state({ pending: 0, failed: {} as Record<string, unknown>, opError: null as unknown });

  /** 保存済, 保存中 or failed (reactive). */
  get state(): SaveState {
    if (Object.keys(this.#s.failed).length > 0 || this.#s.opError != null) return 'failed';
    return this.#s.pending > 0 ? 'saving' : 'saved';
  }

  /** The error to show: the last failed structural change, else a failed edit (reactive). */
  get error(): unknown {
    if (this.#s.opError != null) return this.#s.opError;
    const keys = Object.keys(this.#s.failed);
    return keys.length > 0 ? this.#s.failed[keys[0]] : null;
  }

  /** Whether the edit of `key` failed (reactive). */
  failed(key: string): boolean {
    return key in this.#s.failed;
  }

  /** Whether `key` has an edit not yet acknowledged (not reactive: read it when reloading). */
  isDirty(key: string): boolean {
    return this.#scheduled.has(key) || (this.#inflight.get(key) ?? 0) > 0 || key in this.#s.failed;
  }

  /** Whether nothing is waiting or on its way. */
  get idle(): boolean {
    return this.#s.pending === 0;
  }

  /** Schedules `send` for `key`, replacing an earlier one not yet sent. `delay` 0 sends at once. */
  edit(key: string, send: () => Promise<unknown>, delay = EDIT_DEBOUNCE_MS) {
    const old = this.#scheduled.get(key);
    if (old) clearTimeout(old.timer);
    else this.#s.pending++;
    const timer = setTimeout(() => this.flush(key), delay);
    this.#scheduled.set(key, { timer, send });
    if (delay === 0) this.flush(key);
  }

  /** Sends the scheduled edit of `key` now (on blur). */
  flush(key: string) {
    const s = this.#scheduled.get(key);
    if (!s) return;
    clearTimeout(s.timer);
    this.#scheduled.delete(key);
    this.#inflight.set(key, (this.#inflight.get(key) ?? 0) + 1);
    this.#enqueue(async () => {
      try {
        await s.send();
        delete this.#s.failed[key];
      } catch (e) {
        this.#s.failed[key] = e;
      } finally {
        const n = (this.#inflight.get(key) ?? 1) - 1;
        if (n > 0) this.#inflight.set(key, n);
        else this.#inflight.delete(key);
      }
    });
  }

  /** Sends every scheduled edit now (before leaving the plan). */
  flushAll() {
    for (const key of [...this.#scheduled.keys()]) this.flush(key);
  }

  /**
   * Runs a structural change after every edit before it; resolves to its value, or undefined when
   * it failed (the error is then shown as the save state's error).
   */
  run<T>(op: () => Promise<T>): Promise<T | undefined> {
    this.#s.pending++;
    this.#s.opError = null;
    return new Promise((resolve) => {
      this.#enqueue(async () => {
        try {
          resolve(await op());
        } catch (e) {
          this.#s.opError = e;
          resolve(undefined);
        }
      });
    });
  }

  /** Sends every scheduled edit now and resolves when nothing is waiting or on its way. */
  settle(): Promise<void> {
    this.flushAll();
    if (this.idle) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  #enqueue(job: () => Promise<void>) {
    this.#chain = this.#chain.then(job).finally(() => {
      this.#s.pending--;
      if (this.#s.pending === 0) {
        const waiting = this.#idle.splice(0);
        for (const r of waiting) r();
      }
    });
  }
}
