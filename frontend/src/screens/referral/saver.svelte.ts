// Sending a letter's field edits to the engine as they are typed.
//
// `edit(field, text)` waits EDIT_DEBOUNCE_MS after the last keystroke in that field (or until
// `flush(field)`, on blur) and sends only the latest text. Edits of one field never overtake each
// other: while one is on its way, a newer text waits and is sent when it is answered. A failed edit
// keeps its text and is sent again by `retry()` or by the next keystroke. `state` is what the small
// 保存済 / 保存中 indicator shows.

import { EDIT_DEBOUNCE_MS } from './model';

export type SaveState = 'saved' | 'saving' | 'failed';

export class FieldSaver<F extends string> {
  #send: (field: F, text: string) => Promise<void>;
  #delay: number;
  #timers = new Map<F, ReturnType<typeof setTimeout>>();
  /** Texts waiting to be sent (scheduled or behind one on its way). */
  #waiting = new Map<F, string>();
  #inflight = new Set<F>();
  /** Texts whose sending failed, by field. */
  #failed = new Map<F, string>();
  #idle: (() => void)[] = [];
  /** How many edits each field has had (a reload started before an edit must not undo it). */
  #edits = new Map<F, number>();
  #s = $state<{ busy: number; error: unknown }>({ busy: 0, error: null });

  constructor(send: (field: F, text: string) => Promise<void>, delay = EDIT_DEBOUNCE_MS) {
    this.#send = send;
    this.#delay = delay;
  }

  /** 保存済, 保存中 or failed (reactive). */
  get state(): SaveState {
    if (this.#s.error != null) return 'failed';
    return this.#s.busy > 0 ? 'saving' : 'saved';
  }

  /** Why the last edit failed (reactive; null once everything is saved again). */
  get error(): unknown {
    return this.#s.error;
  }

  /** Whether `field` has text the engine has not acknowledged (keep it over a reload). */
  dirty(field: F): boolean {
    return this.#timers.has(field) || this.#waiting.has(field) || this.#inflight.has(field) || this.#failed.has(field);
  }

  /** How many edits `field` has had so far: compare before and after a reload. */
  edits(field: F): number {
    return this.#edits.get(field) ?? 0;
  }

  /** Whether nothing is waiting, on its way or failed. */
  get idle(): boolean {
    return this.#timers.size === 0 && this.#waiting.size === 0 && this.#inflight.size === 0;
  }

  /** Schedules `text` as the new content of `field`. */
  edit(field: F, text: string) {
    this.#edits.set(field, this.edits(field) + 1);
    this.#failed.delete(field);
    this.#waiting.set(field, text);
    const old = this.#timers.get(field);
    if (old) clearTimeout(old);
    this.#timers.set(
      field,
      setTimeout(() => this.flush(field), this.#delay),
    );
    this.#update();
  }

  /** Sends the waiting text of `field` now (on blur). */
  flush(field: F) {
    const timer = this.#timers.get(field);
    if (timer) {
      clearTimeout(timer);
      this.#timers.delete(field);
    }
    if (this.#inflight.has(field) || !this.#waiting.has(field)) {
      this.#update();
      return;
    }
    const text = this.#waiting.get(field) as string;
    this.#waiting.delete(field);
    this.#inflight.add(field);
    this.#update();
    this.#send(field, text).then(
      () => {
        this.#inflight.delete(field);
        if (this.#failed.size === 0) this.#s.error = null;
        this.#after(field);
      },
      (e: unknown) => {
        this.#inflight.delete(field);
        // Keep the text unless a newer one is already waiting.
        if (!this.#waiting.has(field)) this.#failed.set(field, text);
        this.#s.error = e;
        this.#after(field);
      },
    );
  }

  /** Sends everything waiting now (before sending the letter, printing or leaving). */
  flushAll() {
    for (const f of [...this.#timers.keys(), ...this.#waiting.keys()]) this.flush(f);
  }

  /** Sends the failed texts again. */
  retry() {
    const failed = [...this.#failed];
    this.#failed.clear();
    this.#s.error = null;
    for (const [f, text] of failed) {
      if (!this.#waiting.has(f)) this.#waiting.set(f, text);
      this.flush(f);
    }
    this.#update();
  }

  /** Sends everything and resolves when all is answered; true when all of it was saved. */
  async settle(): Promise<boolean> {
    this.flushAll();
    if (!this.idle) await new Promise<void>((r) => this.#idle.push(r));
    return this.#failed.size === 0;
  }

  #after(field: F) {
    if (this.#waiting.has(field) && !this.#timers.has(field)) this.flush(field);
    this.#update();
  }

  #update() {
    const keys = new Set<F>([...this.#timers.keys(), ...this.#waiting.keys(), ...this.#inflight]);
    this.#s.busy = keys.size;
    if (this.idle) {
      const waiters = this.#idle.splice(0);
      for (const w of waiters) w();
    }
  }
}
