// The engine's commands and events, as screens should use them.
//
// `bindings.ts` is generated from the Rust types by tauri-specta (never edit it). Every command
// there returns `Promise<Result<T, AppError>>`; `unwrap` turns that into `Promise<T>` that throws an
// `AppFailure`, and `onEvent` subscribes to a typed event with a synchronous disposer that fits
// `$effect` cleanups.
//
//   import { commands, unwrap, onEvent, events } from '$lib/api';
//   const plans = await unwrap(commands.listCarePlans());
//   $effect(() => onEvent(events.documentChanged, (d) => { if (d.kind === 'care-plan') reload(); }));

import type { AppError, ErrorKind, Result } from './bindings';

export * from './bindings';

/** Every error kind the engine can report, in its `kind` field. */
export const ERROR_KINDS: readonly ErrorKind[] = [
  'not_initialised',
  'already_initialised',
  'wrong_passphrase',
  'locked',
  'not_signed_in',
  'bad_credentials',
  'sign_in_locked',
  'session_locked',
  'admin_only',
  'no_card',
  'unknown_card',
  'wrong_pin',
  'card_required',
  'pin_locked',
  'not_enrolled',
  'bad_invite',
  'invite_expired',
  'invite_refused',
  'already_enrolled',
  'trust',
  'safety_number_mismatch',
  'unreachable',
  'refused',
  'not_found',
  'no_key',
  'read_only',
  'invalid_input',
  'card',
  'storage',
  'internal',
];

/** A command's failure: `kind` says what to do (see `errorText`), `message` is the engine's English detail. */
export class AppFailure extends Error {
  readonly kind: ErrorKind;
  /** `sign_in_locked`: seconds until the next try is taken. */
  readonly retryAfterS: number | null;
  /** `wrong_pin`: tries left before the PIN locks. */
  readonly triesLeft: number | null;
  constructor(kind: ErrorKind, message: string, retryAfterS: number | null = null, triesLeft: number | null = null) {
    super(message);
    this.name = 'AppFailure';
    this.kind = kind;
    this.retryAfterS = retryAfterS;
    this.triesLeft = triesLeft;
  }

  /** The error as it crossed IPC. */
  toAppError(): AppError {
    return { kind: this.kind, message: this.message, retry_after_s: this.retryAfterS, tries_left: this.triesLeft };
  }
}

function isAppError(e: unknown): e is AppError {
  return (
    typeof e === 'object' &&
    e !== null &&
    typeof (e as AppError).kind === 'string' &&
    (ERROR_KINDS as readonly string[]).includes((e as AppError).kind)
  );
}

/** Any thrown value as an `AppFailure` (unknown values become `internal`). */
export function toFailure(e: unknown): AppFailure {
  if (e instanceof AppFailure) return e;
  if (isAppError(e)) {
    const n = (v: unknown) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
    return new AppFailure(e.kind, typeof e.message === 'string' ? e.message : '', n(e.retry_after_s), n(e.tries_left));
  }
  if (e instanceof Error) return new AppFailure('internal', e.message);
  return new AppFailure('internal', typeof e === 'string' ? e : JSON.stringify(e) ?? String(e));
}

let onLocked: (() => void) | null = null;

/**
 * Calls `cb` whenever a command is refused because the session locked (the shell's own idle
 * check, or a lock the UI has not heard of yet): the app then shows its lock screen.
 */
export function whenSessionLocked(cb: () => void) {
  onLocked = cb;
}

let inflight = 0;
let whenIdle: (() => void)[] = [];

/**
 * Resolves once no command is on its way (at most after `maxMs`): locking the session waits for
 * edits already sent, so they are saved rather than refused.
 */
export function settled(maxMs = 2_000): Promise<void> {
  if (inflight === 0) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, maxMs);
    whenIdle.push(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** The command's data, or a thrown `AppFailure`. */
export async function unwrap<T>(p: Promise<Result<T, AppError>>): Promise<T> {
  let r: Result<T, AppError>;
  inflight++;
  try {
    r = await p;
  } catch (e) {
    throw toFailure(e);
  } finally {
    inflight--;
    if (inflight === 0) {
      const due = whenIdle;
      whenIdle = [];
      for (const w of due) w();
    }
  }
  if (r.status === 'ok') return r.data;
  const failure = toFailure(r.error);
  if (failure.kind === 'session_locked') onLocked?.();
  throw failure;
}

// While the session is locked, events wait: the screens behind the lock screen do not reload
// (their commands would be refused) and get what happened once the same staff member is back.
/** Most events kept while the session is locked (the oldest are dropped beyond it). */
export const HELD_EVENTS_MAX = 1000;
let held = false;
let waiting: (() => void)[] = [];

/** Holds events back (while the session is locked), or delivers those held, in order. */
/** Forgets the events held while the session was locked (another staff member signed in). */
export function dropHeldEvents() {
  waiting = [];
}

export function holdEvents(hold: boolean) {
  held = hold;
  if (hold) return;
  const due = waiting;
  waiting = [];
  for (const deliver of due) deliver();
}

/** A generated event object (`events.syncStatus`, ...): only `listen` is needed here. */
export interface Listenable<T> {
  listen(cb: (event: { payload: T }) => void): Promise<() => void>;
}

/**
 * Calls `cb` with each payload of `event` until the returned function is called.
 * The disposer is synchronous, so `$effect(() => onEvent(events.x, cb))` cleans up on unmount,
 * even if it runs before the listener is registered. While the session is locked, payloads wait
 * until it is open again (`holdEvents`), unless `whileLocked` (the lock screen's own listeners).
 */
export function onEvent<T>(
  event: Listenable<T>,
  cb: (payload: T) => void,
  opts: { whileLocked?: boolean } = {},
): () => void {
  let disposed = false;
  let unlisten: (() => void) | null = null;
  event
    .listen((e) => {
      if (disposed) return;
      if (held && !opts.whileLocked) {
        waiting.push(() => {
          if (!disposed) cb(e.payload);
        });
        if (waiting.length > HELD_EVENTS_MAX) waiting.shift();
        return;
      }
      cb(e.payload);
    })
    .then(
      (u) => {
        if (disposed) u();
        else unlisten = u;
      },
      (e) => console.error('listening to an event failed', e),
    );
  return () => {
    disposed = true;
    if (unlisten) {
      unlisten();
      unlisten = null;
    }
  };
}
