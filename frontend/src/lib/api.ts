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
  constructor(kind: ErrorKind, message: string) {
    super(message);
    this.name = 'AppFailure';
    this.kind = kind;
  }

  /** The error as it crossed IPC. */
  toAppError(): AppError {
    return { kind: this.kind, message: this.message };
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
  if (isAppError(e)) return new AppFailure(e.kind, typeof e.message === 'string' ? e.message : '');
  if (e instanceof Error) return new AppFailure('internal', e.message);
  return new AppFailure('internal', typeof e === 'string' ? e : JSON.stringify(e) ?? String(e));
}

/** The command's data, or a thrown `AppFailure`. */
export async function unwrap<T>(p: Promise<Result<T, AppError>>): Promise<T> {
  let r: Result<T, AppError>;
  try {
    r = await p;
  } catch (e) {
    throw toFailure(e);
  }
  if (r.status === 'ok') return r.data;
  throw toFailure(r.error);
}

/** A generated event object (`events.syncStatus`, ...): only `listen` is needed here. */
export interface Listenable<T> {
  listen(cb: (event: { payload: T }) => void): Promise<() => void>;
}

/**
 * Calls `cb` with each payload of `event` until the returned function is called.
 * The disposer is synchronous, so `$effect(() => onEvent(events.x, cb))` cleans up on unmount,
 * even if it runs before the listener is registered.
 */
export function onEvent<T>(event: Listenable<T>, cb: (payload: T) => void): () => void {
  let disposed = false;
  let unlisten: (() => void) | null = null;
  event
    .listen((e) => {
      if (!disposed) cb(e.payload);
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
