// A user action that calls the engine: `busy` while it runs, `error` when it failed.
//
//   const save = action(async () => { await unwrap(commands.savePlan(plan)); });
//   <button disabled={save.busy} onclick={() => save.run()}>...</button>
//   <ErrorBanner error={save.error} />

export interface Action<A extends unknown[], T> {
  /** Whether it is running. */
  readonly busy: boolean;
  /** What the last run threw (null after a success or `clear`). */
  readonly error: unknown;
  /** Runs it (ignored while running); resolves to its value, or undefined when it threw. */
  run(...args: A): Promise<T | undefined>;
  /** Forgets the last error. */
  clear(): void;
}

export function action<A extends unknown[], T>(fn: (...args: A) => Promise<T>): Action<A, T> {
  const s = $state<{ busy: boolean; error: unknown }>({ busy: false, error: null });
  return {
    get busy() {
      return s.busy;
    },
    get error() {
      return s.error;
    },
    async run(...args: A) {
      if (s.busy) return undefined;
      s.busy = true;
      s.error = null;
      try {
        return await fn(...args);
      } catch (e) {
        s.error = e;
        return undefined;
      } finally {
        s.busy = false;
      }
    },
    clear() {
      s.error = null;
    },
  };
}
