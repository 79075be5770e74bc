// Dates of the care plan: stored as `YYYY-MM-DD` (Japan's calendar day), shown in the UI's language.

import { isoDate, toMs } from '$lib/dates';
import { formatTime, i18n } from '$lib/i18n.svelte';

/** Today in Japan, `YYYY-MM-DD`. */
export function todayJst(now: Date = new Date()): string {
  const parts = new Intl.DateTimeFormat('en-CA', {
    timeZone: 'Asia/Tokyo',
    year: 'numeric',
    month: '2-digit',
    day: '2-digit',
  }).formatToParts(now);
  const get = (t: string) => parts.find((p) => p.type === t)?.value ?? '';
  return `${get('year')}-${get('month')}-${get('day')}`;
}

/** `2025-01-09` as 2025年1月9日 / 9 Jan 2025 (empty stays empty; anything else is shown as is). */
export function showDate(d: string): string {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(d.trim());
  if (!m) return d;
  const [, y, mo, da] = m;
  if (i18n.lang === 'ja') return `${Number(y)}年${Number(mo)}月${Number(da)}日`;
  const months = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
  return `${Number(da)} ${months[Number(mo) - 1] ?? mo} ${y}`;
}

/** An RFC 3339 time as a local date and time, 2025年1月9日 14:05 / 9 Jan 2025 14:05. */
export function showTimestamp(rfc3339: string): string {
  const ms = toMs(rfc3339);
  if (ms === null) return rfc3339;
  return `${showDate(isoDate(new Date(ms)))} ${formatTime(ms)}`;
}

/** Minutes since midnight of `HH:MM` (NaN when malformed). */
export function minutes(hhmm: string): number {
  const m = /^(\d{1,2}):(\d{2})$/.exec(hhmm.trim());
  return m ? Number(m[1]) * 60 + Number(m[2]) : NaN;
}
