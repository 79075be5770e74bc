// The sync status: polled once, then kept current by the `SyncStatus` event.

import { commands, events, onEvent, unwrap, type RelayBehindNotice, type SyncStatus } from './api';
import { formatDateTime, t } from './i18n.svelte';

const state = $state<{ status: SyncStatus | null }>({ status: null });

/** The latest sync status (reactive; null until known). */
export const sync = {
  get status(): SyncStatus | null {
    return state.status;
  },
};

/** The sync state in a clerk's words (offline says how many changes wait to be sent). */
export function syncWords(s: SyncStatus | null): string {
  if (!s) return t('status.unknown');
  if (s.state === 'offline') return t('status.offline', { n: s.pending });
  return t(`status.${s.state}`);
}

/** What happened when the relay went back in time (restored from a backup, or rolled back), with when. */
export function relayBehindWords(n: RelayBehindNotice): string {
  return t(n.restored ? 'status.relayRestored' : 'status.relayBehind', { time: formatDateTime(n.at_ms) });
}

/**
 * Follows the sync status until the returned function is called: subscribes to the event, then
 * asks once. An event that arrives before the answer wins over it.
 */
export function followSync(): () => void {
  let fromEvent = false;
  const stop = onEvent(events.syncStatus, (s: SyncStatus) => {
    fromEvent = true;
    state.status = s;
  });
  unwrap(commands.syncStatus()).then(
    (s) => {
      if (!fromEvent) state.status = s;
    },
    (e) => console.error('sync status', e),
  );
  return stop;
}

/** Asks the engine for the sync status once (after joining or unlocking, when sync starts). */
export async function refreshSync(): Promise<void> {
  try {
    state.status = await unwrap(commands.syncStatus());
  } catch (e) {
    console.error('sync status', e);
  }
}

/** Asks the engine to sync now. Throws an `AppFailure`. */
export async function syncNow(): Promise<void> {
  await unwrap(commands.syncNow());
}
