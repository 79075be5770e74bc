// Times and dates as the engine sends them: RFC 3339 times, `YYYY-MM-DD` dates. (Words for them in
// the UI's language: `formatDate`, `formatTime`, `formatDateTime` in `i18n.svelte.ts`.)

/** Milliseconds since the epoch of an RFC 3339 time, or null when empty or malformed. */
export function toMs(time: string | null | undefined): number | null {
  if (!time) return null;
  const ms = Date.parse(time);
  return Number.isNaN(ms) ? null : ms;
}

/** Age in whole years on `at` of someone born on `birth` (`YYYY-MM-DD`), or null. */
export function ageOn(birth: string, at: Date = new Date()): number | null {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(birth.trim());
  if (!m) return null;
  const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
  let age = at.getFullYear() - y;
  if (at.getMonth() + 1 < mo || (at.getMonth() + 1 === mo && at.getDate() < d)) age--;
  return age >= 0 && age < 150 ? age : null;
}

/** The local calendar day of `d` as `YYYY-MM-DD`. */
export function isoDate(d: Date): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
}
