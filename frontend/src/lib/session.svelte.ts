// Where the app stands (phase, facility, signed-in staff member), shared by the shell and screens,
// and the session lock (画面ロック): a session locks after the idle time without input (`watchIdle`,
// started by the app while a session is open), when the staff member locks it, or when the engine
// refuses a command because it locked the session itself. While locked, events wait (`holdEvents`).

import {
  commands,
  dropHeldEvents,
  holdEvents,
  settled,
  unwrap,
  whenSessionLocked,
  type AppStatus,
  type IdleLockSetting,
  type LockReason,
  type Staff,
} from './api';

const state = $state<{ status: AppStatus | null; screenEpoch: number }>({ status: null, screenEpoch: 0 });
/** Whether the engine refused a command because it had locked the session before the UI knew. */
let refusedUnseen = false;

/** The app's status as last reported by the engine (reactive). */
export const session = {
  /** The last `appStatus()` (null before the first answer). */
  get status(): AppStatus | null {
    return state.status;
  },
  /** The signed-in staff member, if any (also while their session is locked). */
  get staff(): Staff | null {
    return state.status?.staff ?? null;
  },
  /** Whether the signed-in staff member's session is locked. */
  get locked(): boolean {
    return state.status?.phase === 'session_locked';
  },
  /** Whether the signed-in staff member is an administrator of this device. */
  get admin(): boolean {
    return state.status?.staff?.role === 'admin';
  },
  /** The idle lock in force (null before the first answer). */
  get idleLock(): IdleLockSetting | null {
    return state.status?.idle_lock ?? null;
  },
  /** This facility's role in the deployment (null before joining). */
  get role(): AppStatus['facility_role'] {
    return state.status?.facility_role ?? null;
  },
  /** This facility's name (null while locked). */
  get facilityName(): string | null {
    return state.status?.facility_name ?? null;
  },
  /**
   * Changes when the work screen should be drawn afresh: after signing in again to a session the
   * engine had locked while the screen was still working (its reads were refused then).
   */
  get screenEpoch(): number {
    return state.screenEpoch;
  },
};

function record(s: AppStatus) {
  const was = state.status?.phase;
  const before = state.status?.staff?.login;
  state.status = s;
  // Events held for a locked session belong to its screens: another staff member signing in
  // starts afresh, so they are dropped rather than replayed under the new person.
  if (was === 'session_locked' && s.phase === 'ready' && before !== s.staff?.login) dropHeldEvents();
  holdEvents(s.phase === 'session_locked');
  if (was === 'session_locked' && s.phase === 'ready' && refusedUnseen) {
    refusedUnseen = false;
    state.screenEpoch++;
  }
}

/** Records a status a command returned (`createFacility`, `unlock`, `join`). */
export function setStatus(s: AppStatus) {
  record(s);
}

/** Asks the engine where the app stands and records it. Throws an `AppFailure`. */
export async function refreshStatus(): Promise<AppStatus> {
  const s = await unwrap(commands.appStatus());
  record(s);
  return s;
}

/**
 * Locks the session: the work screens are hidden at once (before the engine answers, so nothing
 * stays on screen if it is slow or fails), then the engine records the lock.
 */
export async function lockSession(reason: LockReason): Promise<void> {
  if (state.status && state.status.phase === 'ready') record({ ...state.status, phase: 'session_locked' });
  // Edits already on their way (a field left by clicking 「画面をロック」) are saved first.
  await settled();
  try {
    record(await unwrap(commands.lockSession(reason)));
  } catch (e) {
    // The screens stay hidden; signing in again opens them.
    console.error('locking the session', e);
  }
}

// A command refused because the engine locked the session: show the lock screen.
whenSessionLocked(() => {
  if (state.status?.phase === 'ready') refusedUnseen = true;
  refreshStatus().catch((e) => console.error('app status after a locked session', e));
});

/** DOM events that count as someone using the app. */
const INPUT_EVENTS = ['pointerdown', 'pointermove', 'keydown', 'wheel', 'touchstart'] as const;

/**
 * Watches for input while a session is open: after `lock.idle_ms` without any, locks it
 * (`lockSession('idle')`); while someone works, tells the engine at most every
 * `lock.touch_every_ms` (`session_touch`), so that its own idle check agrees. Returns the stop
 * function (fits an `$effect` cleanup).
 */
export function watchIdle(lock: IdleLockSetting): () => void {
  let last = Date.now();
  let lastTouch = last;
  let fired = false;
  const seen = (e: Event) => {
    // A pointer that did not move (browsers send such events when the page changes under it) is
    // not someone at the computer.
    if (e.type === 'pointermove' && (e as PointerEvent).movementX === 0 && (e as PointerEvent).movementY === 0) return;
    // The first input after the idle time (a computer waking from sleep, a window restored)
    // does not keep the session open: it locks first.
    if (!fired && Date.now() - last >= lock.idle_ms) {
      fired = true;
      lockSession('idle');
      return;
    }
    last = Date.now();
    if (last - lastTouch >= lock.touch_every_ms) {
      lastTouch = last;
      unwrap(commands.sessionTouch()).catch(() => {
        // A refusal (`session_locked`) shows the lock screen through `whenSessionLocked`.
      });
    }
  };
  for (const e of INPUT_EVENTS) window.addEventListener(e, seen, { capture: true, passive: true });
  // Checked often against the clock rather than by one long timer: a computer that slept past the
  // idle time locks as soon as it wakes.
  const tick = Math.max(200, Math.min(1000, lock.idle_ms / 4));
  const timer = setInterval(() => {
    if (!fired && Date.now() - last >= lock.idle_ms) {
      fired = true;
      lockSession('idle');
    }
  }, tick);
  return () => {
    clearInterval(timer);
    for (const e of INPUT_EVENTS) window.removeEventListener(e, seen, { capture: true });
  };
}
