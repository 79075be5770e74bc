// HQ helpers: sorting the shelter table, the last activity of each shelter from the counts over
// time, ages in words, and the chart's series.

import type { History, ShelterCount } from '$lib/api';
import { occupancy } from '../reception/model';

/** A shelter with no activity in its counts for this long is flagged (no news may be stale news). */
export const STALE_MS = 12 * 3600_000;

export type SortKey = 'name' | 'status' | 'present' | 'capacity' | 'occupancy' | 'care' | 'requests' | 'activity';
export type SortDir = 'asc' | 'desc';

/** People with any care flag, summed over flags (a person with two flags counts twice). */
export function careTotal(s: ShelterCount): number {
  return Object.values(s.care).reduce<number>((a, n) => a + (n ?? 0), 0);
}

/** The care flags of a shelter with their counts, largest first (zeros left out). */
export function careList(s: ShelterCount): [string, number][] {
  return Object.entries(s.care)
    .filter((e): e is [string, number] => (e[1] ?? 0) > 0)
    .sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
}

/**
 * Per shelter id, the time (ms) its head count last changed in `history`, or null when it never
 * had anyone. With the default history (a point at every stay event) this is its last check-in or
 * check-out as far as HQ has received it.
 */
export function lastActivity(history: History | null): Map<string, number | null> {
  const out = new Map<string, number | null>();
  if (!history) return out;
  const times = history.times.map((t) => Date.parse(t));
  for (const s of history.shelters) {
    let last: number | null = null;
    for (let i = 0; i < s.counts.length; i++) {
      const prev = i === 0 ? 0 : s.counts[i - 1];
      if (s.counts[i] !== prev && !Number.isNaN(times[i])) last = times[i];
    }
    out.set(s.id, last);
  }
  return out;
}

function value(s: ShelterCount, key: SortKey, activity: Map<string, number | null>): number | string {
  switch (key) {
    case 'name':
      return s.name;
    case 'status':
      return s.status === 'open' ? 0 : 1;
    case 'present':
      return s.present;
    case 'capacity':
      return s.capacity;
    case 'occupancy':
      return occupancy(s.present, s.capacity) ?? -1;
    case 'care':
      return careTotal(s);
    case 'requests':
      return s.open_requests;
    case 'activity':
      return activity.get(s.id) ?? -1;
  }
}

/** The shelters sorted by `key` (names break ties, in Japanese order). */
export function sortShelters(
  shelters: ShelterCount[],
  key: SortKey,
  dir: SortDir,
  activity: Map<string, number | null>,
): ShelterCount[] {
  const sign = dir === 'asc' ? 1 : -1;
  const collator = new Intl.Collator('ja');
  return [...shelters].sort((a, b) => {
    const va = value(a, key, activity);
    const vb = value(b, key, activity);
    const c = typeof va === 'string' && typeof vb === 'string' ? collator.compare(va, vb) : (va as number) - (vb as number);
    return c !== 0 ? sign * c : collator.compare(a.name, b.name);
  });
}

/** Milliseconds as the largest whole unit: [count, unit]. */
export function ageParts(ms: number): [number, 'now' | 'minutes' | 'hours' | 'days'] {
  if (ms < 60_000) return [0, 'now'];
  if (ms < 3600_000) return [Math.floor(ms / 60_000), 'minutes'];
  if (ms < 86_400_000) return [Math.floor(ms / 3600_000), 'hours'];
  return [Math.floor(ms / 86_400_000), 'days'];
}

/** A file-name stamp of a time: `20240109-1805`. */
export function fileStamp(d: Date = new Date()): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}`;
}
